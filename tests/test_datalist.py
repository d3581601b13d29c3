from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from her2_monai.constants import CLASS_NAMES
from her2_monai.data.datalist import DatalistError, build_datalist, scan_dataset, split_validation
from her2_monai.data.demo import generate_demo_dataset
from her2_monai.data.image_reader import read_rgb


def test_real_bci_pairs_scan_with_labels(shared_data):
    datalist, report = build_datalist(shared_data / "bci", require_labels=True, strict=True)
    test = datalist["test"]
    assert len(test) == 6 and not report.problems and not report.unpaired
    labels = {r["id"]: r["label"] for r in test}
    assert labels == {
        "00007_test_1+": 1,
        "00011_test_3+": 3,
        "00052_test_3+": 3,
        "00118_test_0": 0,
        "00249_test_2+": 2,
        "00640_test_1+": 1,
    }
    for record in test:
        assert record["he"].endswith(f"HE/test/{record['id']}.png") and record["he"].startswith("/")
        assert record["ihc"].endswith(f"IHC/test/{record['id']}.png")


def test_mist_pairs_are_kept_unlabelled_or_rejected_on_request(shared_data):
    datalist, report = build_datalist(shared_data / "mist", val_fraction=0.25)
    records = datalist["training"] + datalist["validation"]
    assert len(records) == 4 and report.unlabelled == 4
    assert all(r["label"] is None and r["he"] and r["ihc"] for r in records)
    assert datalist["validation"] == []  # unlabelled records are never drawn for validation
    with pytest.raises(DatalistError, match="no HER2 score in the file name") as err:
        build_datalist(shared_data / "mist", require_labels=True, strict=True)
    assert len(err.value.problems) == 4


def _make_ab(shared_data, folder, he_left: bool):
    folder.mkdir(parents=True)
    names = []
    for he_path in sorted((shared_data / "bci" / "HE" / "test").iterdir())[:3]:
        he = read_rgb(he_path)[::4, ::4]
        ihc = read_rgb(str(he_path).replace("/HE/", "/IHC/"))[::4, ::4]
        ab = np.concatenate([he, ihc] if he_left else [ihc, he], axis=1)
        Image.fromarray(ab).save(folder / he_path.name, format="JPEG", quality=92)  # JPEG under .png, like BCI
        names.append((he_path.stem, he))
    return names


@pytest.mark.parametrize("he_left", [True, False])
def test_side_by_side_pairs_in_both_orders(shared_data, tmp_path, he_left):
    names = _make_ab(shared_data, tmp_path / "ds" / "AB" / "test", he_left)
    datalist, report = build_datalist(tmp_path / "ds", pairs_dir=tmp_path / "pairs", strict=True)
    assert report.ab_pairs == 3
    by_id = {r["id"]: r for r in datalist["test"]}
    for stem, he in names:
        record = by_id[stem]
        assert record["label"] == CLASS_NAMES.index(stem.split("_")[-1])
        written = read_rgb(record["he"])
        # The written H&E half must be the H&E (JPEG noise only), not the IHC.
        assert np.abs(written.astype(float) - he).mean() < 6.0


def _bad_dataset(tmp_path):
    root = tmp_path / "bad"
    generate_demo_dataset(root, n_per_class=2, image_size=32, n_test_per_class=1)
    train_he, train_ihc = root / "HE" / "train", root / "IHC" / "train"
    files = sorted(train_he.iterdir())
    (train_he / files[0].name).write_bytes(b"corrupt")  # corrupt H&E
    shutil.move(str(train_he / files[1].name), str(train_he / "00100_train_4+.png"))  # unparsable score
    shutil.move(str(train_ihc / files[1].name), str(train_ihc / "00100_train_4+.png"))
    Image.new("RGB", (40, 32)).save(train_ihc / files[2].name)  # size mismatch within the pair
    (train_ihc / files[3].name).unlink()  # H&E without IHC partner
    return root, files


def test_bad_inputs_are_collected_together_with_reasons(tmp_path):
    root, files = _bad_dataset(tmp_path)
    datalist, report = build_datalist(root)
    reasons = {path.split("/")[-1]: reason for path, reason in report.problems}
    assert "not an image file" in reasons[files[0].name]
    assert "unparsable label" in reasons["00100_train_4+.png"]
    assert "size mismatch within the pair: H&E 32x32, IHC 40x32" in reasons[files[2].name]
    assert len(report.problems) == 3
    assert report.unpaired == [str((root / "HE" / "train" / files[3].name).resolve())]
    records = datalist["training"] + datalist["validation"]
    assert len(records) == 8 - 3  # the three problem pairs are skipped, the unpaired one kept
    lonely = [r for r in records if r["id"] == files[3].stem][0]
    assert lonely["he"] and lonely["ihc"] is None
    summary = report.summary(datalist)
    assert "problems (3; affected files skipped)" in summary and "he_only: 1" in summary

    with pytest.raises(DatalistError) as err:
        scan_dataset(root, strict=True)
    assert len(err.value.problems) == 4
    assert any("no IHC partner" in reason for _, reason in err.value.problems)


def test_cli_reports_problems_and_fails_in_strict_mode(tmp_path):
    root, files = _bad_dataset(tmp_path)
    cmd = [sys.executable, "-m", "her2_monai", "datalist", "--dataset_dir", str(root)]
    ok = subprocess.run([*cmd, "--output", str(tmp_path / "dl.json")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "unparsable label" in ok.stdout and files[0].name in ok.stdout
    assert len(json.loads((tmp_path / "dl.json").read_text())["test"]) == 4
    strict = subprocess.run([*cmd, "--output", str(tmp_path / "s.json"), "--strict"], capture_output=True, text=True)
    assert strict.returncode == 2 and not (tmp_path / "s.json").exists()
    assert "4 problem(s)" in strict.stderr and "no IHC partner" in strict.stderr
    missing = subprocess.run([*cmd[:-1], str(tmp_path / "nope"), "--output", "x.json"], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_validation_split_is_stratified_and_seeded():
    records = [{"id": str(i), "label": i % 4} for i in range(80)] + [{"id": "u", "label": None}]
    train, val = split_validation(records, 0.25, seed=1)
    assert sorted(r["label"] for r in val) == sorted([0, 1, 2, 3] * 5)
    assert {r["id"] for r in train} | {r["id"] for r in val} == {r["id"] for r in records}
    assert split_validation(records, 0.25, seed=1)[1] == val
    assert split_validation(records, 0.25, seed=2)[1] != val
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(records, 1.0, seed=0)
