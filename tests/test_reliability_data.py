"""Fault catalogue, datalists and patches at prediction time (docs/reliability.md): malformed datalists are refused
with every problem named; blank and 1x1 patches get no score (referred, ``no_tissue``), rotated patches and pairs of
mismatched sizes get finite predictions; unicode and space-containing paths work end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE_CONFIGS, bundle_component, run_bundle
from hostile_files import exif_rotated_jpeg, tissue, write
from PIL import Image
from test_bundle_eval_infer import demo_dataset, deployed_bundle  # noqa: F401  (session fixture)

from her2_monai.cli import main
from her2_monai.data.datalist import DatalistError, build_datalist, load_datalist_split, write_datalist
from her2_monai.inference import collect_records, load_predictor


def _datalist(tmp_path: Path, content, name: str = "datalist.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _patch(path: Path, seed: int = 0, size: int = 40) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tissue(size, size, seed)).save(path, format="PNG")
    return str(path)


# ---------------------------------------------------------------------------------------------- datalists
def test_bad_json_names_the_file_and_the_position(tmp_path):
    for content in ('{"training": [', "", '{"training": [{"he": "a.png",}]}'):
        path = _datalist(tmp_path, content)
        with pytest.raises(ValueError, match=f"datalist '{path}' is not valid JSON: .*line 1 column"):
            load_datalist_split(path, "training")
        with pytest.raises(ValueError, match="is not valid JSON"):
            collect_records(datalist=path)


def test_a_missing_datalist_a_missing_split_and_an_empty_selection_are_named(tmp_path):
    absent = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match=f"datalist '{absent}' not found; create it with `python -m her2_monai"):
        load_datalist_split(absent, "training")
    he = _patch(tmp_path / "he.png")
    path = _datalist(tmp_path, {"training": [{"he": he, "label": None, "id": "unlabelled"}]})
    with pytest.raises(KeyError, match=r"has no 'validation' list \(found \['training'\]\)"):
        load_datalist_split(path, "validation")
    assert load_datalist_split(path, "training")[0]["id"] == "unlabelled"  # kept for the stain translation ...
    with pytest.raises(ValueError, match="has no labelled records in 'training'"):
        load_datalist_split(path, "training", require_label=True)  # ... but nothing for the classifier


def test_records_without_stains_or_of_the_wrong_type_are_listed_together(tmp_path):
    he = _patch(tmp_path / "he.png")
    path = _datalist(
        tmp_path,
        {"training": [{"he": he, "label": 1, "id": "ok"}, {"label": 2, "id": "no_image"}, "he.png", {"he": 5}]},
    )
    with pytest.raises(DatalistError) as err:
        load_datalist_split(path, "training")
    reasons = {where.split(" record ")[1]: reason for where, reason in err.value.problems}
    assert len(reasons) == 3
    assert "none of 'he', 'ihc' is given" in reasons["1 ('no_image')"]
    assert "a record must be an object" in reasons["2"] and "'he' must be an image path or null" in reasons["3"]
    with pytest.raises(DatalistError, match="expected a list of records, got dict"):
        load_datalist_split(_datalist(tmp_path, {"training": {"he": he}}, "d2.json"), "training")


def test_wrong_label_values_are_refused_with_the_fix(tmp_path):
    he = _patch(tmp_path / "he.png")
    records = [{"he": he, "label": "2+"}, {"he": he, "label": 7}, {"he": he, "label": True}, {"he": he, "label": 1.0}]
    with pytest.raises(DatalistError) as err:
        load_datalist_split(_datalist(tmp_path, {"test": records}), "test")
    reasons = [reason for _, reason in err.value.problems]
    assert len(reasons) == 4
    assert "got '2+' (write the score 2+ as 2)" in reasons[0] and "out of range 0..3" in reasons[1]
    assert "got True" in reasons[2] and "got 1.0" in reasons[3]


def test_duplicate_ids_are_refused_for_training_and_renamed_for_inference(tmp_path):
    he, ihc = _patch(tmp_path / "he.png"), _patch(tmp_path / "ihc.png", 1)
    records = [{"he": he, "ihc": ihc, "label": 0, "id": "case"}, {"he": ihc, "label": 1, "id": "case"}]
    path = _datalist(tmp_path, {"training": records, "test": records})
    with pytest.raises(DatalistError, match="id appears 2 times; ids must be unique"):
        load_datalist_split(path, "training")
    assert [r["id"] for r in collect_records(datalist=path, split="test")] == ["case", "case_2"]


def test_relative_paths_are_read_from_the_datalist_folder(tmp_path, monkeypatch):
    folder = tmp_path / "lists"
    (folder / "images").mkdir(parents=True)
    _patch(folder / "images" / "he.png")
    content = {"validation": [{"he": "images/he.png", "label": 2}], "test": [{"image": "images/he.png"}]}
    path = _datalist(folder, content)
    monkeypatch.chdir(tmp_path)  # not the datalist's folder
    assert load_datalist_split(path, "validation")[0]["he"] == str(folder / "images" / "he.png")
    assert collect_records(datalist=path, split="test")[0]["image"] == str(folder / "images" / "he.png")


def test_datalist_images_outside_its_folder_are_refused_unless_allowed(tmp_path):
    folder = tmp_path / "lists"
    inside = _patch(folder / "images" / "in.png")
    above = _patch(tmp_path / "above.png")
    elsewhere = _patch(tmp_path / "store" / "x.png")
    records = [{"he": "images/in.png"}, {"he": "../above.png"}, {"ihc": str(elsewhere)}, {"image": "images/../in2.png"}]
    _patch(folder / "in2.png")
    path = _datalist(folder, records)
    with pytest.raises(DatalistError) as err:
        collect_records(datalist=path)
    outside = [where for where, reason in err.value.problems if "lies outside the dataset folder" in reason]
    assert len(outside) == 2 and "record 1" in outside[0] and "record 2" in outside[1]  # every one, not the first
    assert "--datalist_allow_outside_root true" in str(err.value)
    allowed = collect_records(datalist=path, allow_outside_root=True)
    assert [r.get("he") or r.get("ihc") or r.get("image") for r in allowed] == [
        str(inside),
        str(above),
        str(elsewhere),
        str(folder / "in2.png"),
    ]


def test_missing_image_files_are_all_named_when_the_datalist_loads(tmp_path):
    he = _patch(tmp_path / "he.png")
    records = [{"he": str(he), "label": 0}, {"he": "gone.png", "label": 1}, {"ihc": "also/gone.png", "label": 2}]
    path = _datalist(tmp_path, {"training": records})
    for load in (lambda: load_datalist_split(path, "training"), lambda: collect_records(datalist=path)):
        with pytest.raises(DatalistError) as err:
            load()
        missing = [reason for _, reason in err.value.problems if "file not found" in reason]
        assert len(missing) == 2, err.value.problems
        assert str(tmp_path / "gone.png") in missing[0] and str(tmp_path / "also" / "gone.png") in missing[1]


def test_ids_that_would_write_outside_the_prediction_folder_are_refused(tmp_path):
    he = _patch(tmp_path / "he.png")
    for bad in ("../../etc/cron.d/x", "a/b", ".hidden", "..", "dir\\name"):
        path = _datalist(tmp_path, [{"he": he, "id": bad}])
        with pytest.raises(DatalistError, match="is not a plain file name"):
            collect_records(datalist=path)
    # A file whose stem is not a usable name gets a numbered id instead.
    odd = tmp_path / "odd"
    odd.mkdir()
    _patch(odd / "..png")  # stem "."
    assert [r["id"] for r in collect_records(dataset_dir=odd)] == ["case_00000"]


def _unicode_dataset(root: Path) -> Path:
    data = root / "Données HER2 é" / "lab ü 1"
    for split, index in (("train", 0), ("train", 1), ("train", 2), ("train", 3), ("test", 4)):
        name = f"{index:05d}_{split}_{index % 4}+.png".replace("0+", "0")
        for stain, seed in (("HE", index), ("IHC", index + 10)):
            (data / stain / split).mkdir(parents=True, exist_ok=True)
            _patch(data / stain / split / name, seed, size=32)
    return data


def test_unicode_and_space_paths_scan_load_and_preprocess(tmp_path):
    data = _unicode_dataset(tmp_path)
    datalist, report = build_datalist(data, val_fraction=0.25)
    assert not report.problems and sum(len(v) for v in datalist.values()) == 5
    path = write_datalist(datalist, tmp_path / "liste données.json")
    records = load_datalist_split(path, "test")
    assert "Données HER2 é/lab ü 1" in records[0]["he"]
    item = bundle_component("train.json", "stain_preprocessing", image_size=16)(records[0])
    assert tuple(item["he"].shape) == (3, 16, 16) and item["mask"].tolist() == [1.0, 1.0]


def test_unicode_and_space_paths_are_predicted_into_files_of_the_same_name(deployed_bundle, tmp_path):  # noqa: F811
    folder = tmp_path / "Patient é 7"
    folder.mkdir()
    _patch(folder / "coupe ü 1.png")
    out = tmp_path / "prédictions"
    where = {"bundle_root": str(deployed_bundle), "dataset_dir": str(folder), "prediction_dir": str(out)}
    run_bundle("inference.json", "inferring", **where)
    result = json.loads((out / "coupe ü 1.json").read_text())
    assert result["id"] == "coupe ü 1" and result["inputs"]["image"] == str(folder / "coupe ü 1.png")


# ------------------------------------------------------------------------------- patches at prediction time
def _finite(result: dict) -> dict:
    probabilities = result["probabilities"]
    assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probabilities), result
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4) and math.isfinite(result["confidence"])
    return result


def _refused(result: dict, issue: str) -> dict:
    """No HER2 score for an image without tissue: every number is null and the case is referred, saying why."""
    assert result["score"] is None and result["probabilities"] is None and result["confidence"] is None, result
    assert result["refer"] is True and result["refer_reasons"][0] == "no_tissue", result
    assert any(issue in warning for warning in result["warnings"]), result["warnings"]
    return result


def test_blank_and_tiny_patches_are_refused_rotated_and_mismatched_ones_are_scored(capsys, deployed_bundle, tmp_path):  # noqa: F811
    white, black = tmp_path / "white.png", tmp_path / "black.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(white)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(black)
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (180, 90, 160)).save(dot)
    rotated = write(tmp_path / "rotated.jpg", exif_rotated_jpeg(tissue(40, 64)))
    data = demo_dataset(deployed_bundle)
    he = data / "HE" / "test" / "00019_test_2+.png"
    large_ihc = tmp_path / "large_ihc.png"
    with Image.open(data / "IHC" / "test" / "00019_test_2+.png") as ihc:
        assert ihc.size != (72, 48)
        ihc.resize((72, 48)).save(large_ihc)  # another size and aspect than its H&E partner

    # The command line, once: one JSON line for a blank pair, no score, exit 0 (the answer is "refer").
    config = str(BUNDLE_CONFIGS / "inference.json")
    code = main(["predict", "--he", str(white), "--ihc", str(black), "--bundle", str(deployed_bundle),
                 "--config_file", config])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.strip().splitlines()) == 1, captured.err
    assert _refused(json.loads(captured.out), "blank image")["scenario"] == "dual"
    # The same predictor for the other cases.
    predictor = load_predictor(deployed_bundle, config)
    for image in (white, black):
        _refused(predictor.predict(image=image), "blank image")
    _refused(predictor.predict(he=dot), "1x1 px")
    assert _finite(predictor.predict(image=rotated))["detected_stains"]
    assert _finite(predictor.predict(he=he, ihc=large_ihc))["scenario"] == "dual"


def test_stain_preprocessing_of_blank_patches_is_finite(tmp_path):
    chain = bundle_component("train.json", "stain_preprocessing", image_size=32)
    for colour in ((255, 255, 255), (0, 0, 0)):
        path = tmp_path / f"{colour[0]}.png"
        Image.new("RGB", (48, 48), colour).save(path)
        item = chain({"he": str(path), "ihc": str(path)})
        assert np.isfinite(item["he"].numpy()).all() and np.isfinite(item["ihc"].numpy()).all()
