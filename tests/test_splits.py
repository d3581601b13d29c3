"""Validation splits that keep slides together (id blocks, a group CSV), split coverage, and the demo's slides."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from her2_monai.data.datalist import build_datalist, split_validation
from her2_monai.data.demo import generate_demo_dataset
from her2_monai.data.splits import parse_split_by, record_groups, split_coverage


def _bci_records(n_slides: int, per_slide: int) -> list[dict]:
    """Records whose slides are blocks of ``per_slide`` consecutive ids; each slide has one (slide-level) label."""
    return [
        {"id": f"{s * per_slide + j:05d}_train_x", "label": s % 4, "slide": f"S{s}"}
        for s in range(n_slides)
        for j in range(per_slide)
    ]


def test_split_by_settings_are_parsed_or_refused(tmp_path):
    assert parse_split_by("").kind == "record" and parse_split_by(None).kind == "record"
    assert parse_split_by("id_block:8").block == 8
    table = tmp_path / "slides.csv"
    table.write_text("id,slide\n")
    assert parse_split_by(f"csv:{table}").path == table
    for bad, message in (("id_block:0", "N a whole number >= 1"), ("id_block:x", "id_block:N"), ("slides", "got")):
        with pytest.raises(ValueError, match=message):
            parse_split_by(bad)
    with pytest.raises(ValueError, match="does not exist"):
        parse_split_by(f"csv:{tmp_path / 'absent.csv'}")


def test_id_block_split_keeps_every_block_on_one_side_and_is_stratified():
    records = _bci_records(n_slides=24, per_slide=5)
    train, val = split_validation(records, 0.25, seed=3, split_by="id_block:5")
    train_slides, val_slides = {r["slide"] for r in train}, {r["slide"] for r in val}
    assert not train_slides & val_slides and len(train) + len(val) == len(records)
    assert sorted(r["label"] for r in val) == sorted([0, 1, 2, 3] * 10)  # 6 slides of 5 per class; 25% = 1.5 -> 2
    assert split_validation(records, 0.25, seed=3, split_by="id_block:5") == (train, val)
    assert split_validation(records, 0.25, seed=4, split_by="id_block:5")[1] != val
    # The patch-level split (the default) mixes slides across the two sides.
    patch_train, patch_val = split_validation(records, 0.25, seed=3)
    assert {r["slide"] for r in patch_train} & {r["slide"] for r in patch_val}


def test_a_class_with_one_slide_stays_in_training_and_is_reported():
    records = _bci_records(n_slides=7, per_slide=3)  # classes 0, 1, 2 have two slides, class 3 has one
    train, val = split_validation(records, 0.2, seed=0, split_by="id_block:3")
    assert {r["label"] for r in val} == {0, 1, 2} and {r["label"] for r in train} == {0, 1, 2, 3}
    assert split_coverage(train, val) == [
        "class 3+: 3 training record(s) and none in validation; its validation recall and F1 are undefined -- "
        "raise --val_fraction or add data"
    ]
    assert "class 0: no training records (all 2 are in validation)" in split_coverage([], [records[0], records[1]])[0]


def test_group_csv_matches_ids_by_stem_name_or_number(tmp_path):
    records = _bci_records(n_slides=8, per_slide=2) + [{"id": "mist_pair", "label": None}]
    table = tmp_path / "groups.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["File", "Slide"])
        for i, r in enumerate(records[:-1]):
            key = (r["id"], r["id"] + ".png", r["id"][:5])[i % 3]
            writer.writerow([key, r["slide"]])
    groups = record_groups(records, f"csv:{table}")
    assert groups[:-1] == [r["slide"] for r in records[:-1]]
    train, val = split_validation(records, 0.25, seed=0, split_by=f"csv:{table}")
    assert not {r["slide"] for r in train if "slide" in r} & {r["slide"] for r in val}
    assert records[-1] in train  # unlabelled records (no CSV row needed) stay in training
    table.write_text("id,slide\n00000_train_x,S0\n")
    with pytest.raises(ValueError, match=r"no row for 15 labelled record\(s\): 00001_train_x"):
        record_groups(records, f"csv:{table}")
    table.write_text("name,site\na,b\n")
    with pytest.raises(ValueError, match="needs an id column"):
        record_groups(records, f"csv:{table}")
    with pytest.raises(ValueError, match="does not start with a number"):
        record_groups(records, "id_block:4")


def test_demo_slides_are_id_blocks_listed_in_slides_csv(tmp_path):
    root = tmp_path / "demo"
    generate_demo_dataset(
        root, n_per_class=6, image_size=32, n_test_per_class=2, patches_per_slide=4, heterogeneity=0.5
    )
    with open(root / "slides.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 6 + 4 * 2
    for row in rows:  # slide s holds ids s*4 ... s*4+3; one slide, one (slide-level) label
        assert int(row["id"][:5]) // 4 == int(row["slide"][len("slide") :])
    by_slide = {}
    for row in rows:
        by_slide.setdefault(row["slide"], set()).add(row["label"])
    assert all(len(labels) == 1 for labels in by_slide.values())
    assert any(row["rendered_label"] != row["label"] for row in rows)  # heterogeneity renders neighbouring scores
    assert json.loads((root / "demo.json").read_text())["patches_per_slide"] == 4
    by_block, report = build_datalist(root, val_fraction=0.3, seed=1, split_by="id_block:4")
    by_csv, _ = build_datalist(root, val_fraction=0.3, seed=1, split_by=f"csv:{root / 'slides.csv'}")
    assert [r["id"] for r in by_block["validation"]] == [r["id"] for r in by_csv["validation"]]
    assert report.split_info == "validation drawn by id_block:4: 4 of 8 groups in validation, none shared with training"
    # Without slides the generator numbers patches as it always did, and writes no slides.csv.
    generate_demo_dataset(tmp_path / "plain", n_per_class=2, image_size=32, n_test_per_class=1)
    assert sorted(p.name for p in (tmp_path / "plain" / "HE" / "train").iterdir())[:2] == [
        "00001_train_0.png",
        "00002_train_0.png",
    ]
    assert not (tmp_path / "plain" / "slides.csv").exists()


def test_datalist_command_takes_split_by_and_reports_it(tmp_path):
    root = tmp_path / "demo"
    generate_demo_dataset(root, n_per_class=4, image_size=32, n_test_per_class=1, patches_per_slide=2)
    cmd = [sys.executable, "-m", "her2_monai", "datalist", "--dataset_dir", str(root), "--output"]
    done = subprocess.run([*cmd, str(tmp_path / "a.json"), "--split_by", "id_block:2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "validation drawn by id_block:2: 4 of 8 groups in validation" in done.stdout
    done = subprocess.run([*cmd, str(tmp_path / "b.json"), "--split_by", "slide"], capture_output=True, text=True)
    assert done.returncode == 2 and "split_by must be" in done.stderr and not (tmp_path / "b.json").exists()
