"""Evaluation (eval/metrics.json) and inference (eval/predictions/) of the trained toy bundle."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_CONFIGS, TINY_TRAINING, pinned_fp32, run_bundle, tiny_overrides

from her2_monai.constants import CLASS_NAMES, SCENARIOS
from her2_monai.data.provenance import DEMO_WARNING
from her2_monai.metrics import CONVENTION

#: The data settings of ``TINY_TRAINING`` (where the demo data is), without any architecture option: the model
#: files record their architecture.
TINY_DATA = {k: TINY_TRAINING[k] for k in ("demo_n_per_class", "demo_image_size", "batch_size", "gan_batch_size")}


def with_forced_selector(source: Path, target: Path, stain: int) -> Path:
    """A copy of ``source/models/model.pt`` in ``target/models`` whose selector calls every image ``stain``
    (0 = H&E, 1 = IHC): zero weights, biased output."""
    state = torch.load(source / "models" / "model.pt", weights_only=True)
    state["selector.classifier.weight"] = torch.zeros_like(state["selector.classifier.weight"])
    state["selector.classifier.bias"] = torch.tensor([10.0, -10.0]) if stain == 0 else torch.tensor([-10.0, 10.0])
    (target / "models").mkdir(parents=True, exist_ok=True)
    torch.save(state, target / "models" / "model.pt")
    return target


def demo_dataset(root: Path) -> Path:
    """The BCI-layout demo folder the training run generated under ``root/cache``."""
    return next(p for p in sorted((root / "cache").iterdir()) if (p / "HE").is_dir())


@pytest.fixture(scope="session")
def deployed_bundle(trained_bundle: Path) -> Path:
    """The trained toy bundle: ``models/model.pt`` holds the classifier, its CM-GAN and its branch selector."""
    return trained_bundle


def _strict_json(path: Path) -> dict:
    def reject(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not valid JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def test_evaluate_reports_every_scenario_and_both_translation_directions(trained_bundle: Path) -> None:
    run_bundle(
        ["train.json", "evaluate.json"], "evaluating", **tiny_overrides(trained_bundle, trained_bundle / "cache")
    )
    report = _strict_json(trained_bundle / "eval" / "metrics.json")
    assert {"scenarios", "translation", "checkpoint", "n_test"} <= set(report)
    assert report["checkpoint"].endswith("models/model.pt") and report["n_test"] == 4  # 1 test pair per class
    assert set(report["scenarios"]) == set(SCENARIOS)
    for name, scenario in report["scenarios"].items():
        cm = np.array(scenario["confusion_matrix"])
        assert cm.shape == (4, 4) and cm.sum() == scenario["n"] == 4, name  # every test record has both stains
        assert scenario["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert set(scenario["per_class"]) == set(CLASS_NAMES)
        for c, cls in enumerate(CLASS_NAMES):
            entry = scenario["per_class"][cls]
            assert entry["support"] == cm[c].sum() == 1
            assert {"precision", "recall", "f1", "auc"} <= set(entry)
            assert entry["recall"] == pytest.approx(cm[c, c] / cm[c].sum())
        f1s = [scenario["per_class"][c]["f1"] for c in CLASS_NAMES]
        assert scenario["macro_f1"] == pytest.approx(float(np.mean(f1s)))
        assert 0.0 <= scenario["her2_low_auc_0_vs_1plus"] <= 1.0
    translation = report["translation"]
    assert translation["convention"] == CONVENTION and translation["resolution"] == [32, 32]
    assert translation["available"] is True and translation["n_pairs"] == 4
    for direction in ("he_to_ihc", "ihc_to_he"):
        assert 0.0 < translation[direction]["psnr"] < 100.0
        assert -1.0 <= translation[direction]["ssim"] <= 1.0
    assert report["provenance"]["source"] == "demo" and report["provenance"]["warnings"] == [DEMO_WARNING]
    assert DEMO_WARNING in (trained_bundle / "eval" / "report.html").read_text()
    leftovers = [p.name for p in (trained_bundle / "eval").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
    from PIL import Image

    with Image.open(trained_bundle / "eval" / "confusion_matrices.png") as figure:
        assert figure.format == "PNG" and figure.width > 2 * figure.height  # one panel per scenario
        assert len(set(figure.convert("L").getdata())) > 10  # drawn, not blank


def test_evaluate_without_a_trained_model_names_the_training_command(tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:
        run_bundle(["train.json", "evaluate.json"], "evaluating", **tiny_overrides(tmp_path, tmp_path / "cache"))
    chain, message = err.value, ""
    while chain is not None:
        message += str(chain)
        chain = chain.__cause__
    assert "trained HER2 classifier not found" in message and "run training" in message
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_inference_config_has_the_monai_label_properties(tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    # No trained weights and no inputs: MONAI (and MONAI Label) build the workflow before either is there.
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "inference.json"),
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(tmp_path),
        shared_backbone="resnet18",
        specific_backbone="resnet10",
        gan_ngf=4,
        gan_n_blocks=1,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "dataset", "evaluator", "bundle_root"):
        assert key in workflow.parser, key
    assert workflow.parser["dataset#transform"] == "@preprocessing"
    assert workflow.parser["evaluator#postprocessing"] == "@postprocessing"
    assert workflow.parser["evaluator#val_handlers"] == "@handlers"
    with pytest.raises(Exception) as err:  # running it without an input explains how to give one
        workflow.run()
    chain, message = err.value, ""
    while chain is not None:
        message += str(chain)
        chain = chain.__cause__
    assert "--datalist FILE.json" in message and "--dataset_dir FOLDER" in message


def test_inference_on_a_bci_folder_writes_one_prediction_per_case(deployed_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    run_bundle(
        "inference.json",
        "inferring",
        bundle_root=str(deployed_bundle),
        dataset_dir=str(demo_dataset(deployed_bundle)),
        datalist_split="test",
        prediction_dir=str(out),
        refer_threshold=0.3,
    )
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [
        "00017_test_0.json",
        "00018_test_1+.json",
        "00019_test_2+.json",
        "00020_test_3+.json",
    ]
    for path in files:
        pred = _strict_json(path)
        assert pred["id"] == path.stem and pred["label"] == path.stem.split("_")[-1]
        assert pred["score"] in CLASS_NAMES and len(pred["probabilities"]) == 4
        assert sum(pred["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert pred["confidence"] == pytest.approx(max(pred["probabilities"]), abs=1e-6)
        assert pred["score"] == CLASS_NAMES[int(np.argmax(pred["probabilities"]))]
        assert ("low_confidence" in pred["refer_reasons"]) == (pred["confidence"] < 0.3)
        assert pred["refer"] == bool(pred["refer_reasons"]) and pred["refer_threshold"] == 0.3
        assert pred["scenario"] == "dual" and pred["stain_source"] == "declared"
        assert len(pred["detected_stains"]) == 2 and set(pred["detected_stains"]) <= {"he", "ihc"}
        assert Path(pred["inputs"]["he"]).is_file() and Path(pred["inputs"]["ihc"]).is_file()


def test_inference_on_a_datalist_routes_declared_and_unknown_stains(
    monkeypatch, deployed_bundle: Path, tmp_path: Path
) -> None:
    # The workflow, the predictor and the bare network are compared: one arithmetic for all three (float32).
    with pinned_fp32(monkeypatch):
        _check_datalist_routing(deployed_bundle, tmp_path)


def _check_datalist_routing(deployed_bundle: Path, tmp_path: Path) -> None:
    # A bundle folder with the trained classifier whose selector calls everything IHC.
    bundle = with_forced_selector(deployed_bundle, tmp_path / "bundle", stain=1)
    data = demo_dataset(deployed_bundle)
    he, ihc = data / "HE" / "test" / "00018_test_1+.png", data / "IHC" / "test" / "00018_test_1+.png"
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(he, plain / "patch.png")  # an H&E image of unknown stain: the (forced) selector calls it IHC
    records = [
        {"he": str(he), "label": 1, "id": "he_case"},
        {"ihc": str(ihc), "id": "ihc_case"},
        {"image": str(plain / "patch.png")},
    ]
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({"test": records}))
    run_bundle(  # the images lie in the session's demo cache, outside the datalist's folder
        "inference.json", "inferring", bundle_root=str(bundle), datalist=str(datalist), datalist_allow_outside_root=True
    )
    out = bundle / "eval" / "predictions"
    assert sorted(p.name for p in out.iterdir()) == ["he_case.json", "ihc_case.json", "patch.json"]
    he_case, ihc_case, patch = (_strict_json(out / f"{n}.json") for n in ("he_case", "ihc_case", "patch"))
    assert he_case["scenario"] == "he_only" and he_case["detected_stains"] == ["ihc"] and he_case["label"] == "1+"
    assert he_case["warnings"] and "given as he looks like ihc" in he_case["warnings"][0]
    assert ihc_case["scenario"] == "ihc_only" and ihc_case["warnings"] == [DEMO_WARNING] and "label" not in ihc_case
    assert he_case["provenance"]["source"] == ihc_case["provenance"]["source"] == "demo"  # the tiny demo model
    assert patch["scenario"] == "ihc_only" and patch["stain_source"] == "selector"
    assert patch["detected_stains"] == ["ihc"] and patch["inputs"] == {"image": str(plain / "patch.png")}

    # The unknown-stain path is exactly the deploy network's 3-channel path.
    from her2_monai.inference import load_predictor

    predictor = load_predictor(bundle, BUNDLE_CONFIGS / "inference.json")
    result = predictor.predict(image=plain / "patch.png")
    batch = predictor.preprocessing({"image": str(plain / "patch.png")})
    with torch.no_grad():
        logits = predictor.network(batch["he"].as_tensor()[None])
    expected = logits.softmax(dim=1)[0].tolist()
    assert result["probabilities"] == pytest.approx(expected, abs=1e-5)
    assert result["probabilities"] == pytest.approx(patch["probabilities"], abs=1e-5)


def test_collect_records_rejects_ambiguous_or_empty_inputs(tmp_path: Path) -> None:
    from her2_monai.inference import collect_records

    with pytest.raises(ValueError, match="exactly one input"):
        collect_records()
    assert collect_records(allow_empty=True) == []
    with pytest.raises(ValueError, match="exactly one input"):
        collect_records(tmp_path, tmp_path / "x.json")
    with pytest.raises(ValueError, match="no images to predict"):
        collect_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        collect_records(tmp_path / "missing")
    (tmp_path / "a.json").write_text(json.dumps({"training": []}))
    with pytest.raises(KeyError, match="no 'test' list"):
        collect_records(datalist=tmp_path / "a.json", split="test")
    for name in ("x.png", "x.jpg"):
        (tmp_path / name).write_bytes(b"")
    ids = [r["id"] for r in collect_records(tmp_path)]
    assert ids == ["x", "x_2"]  # same stem, distinct prediction files


def test_prediction_result_flags_referral_and_rejects_bad_probabilities() -> None:
    from her2_monai.inference import prediction_result

    item = {"pred": torch.tensor([0.1, 0.5, 0.3, 0.1]), "scenario": torch.tensor(1), "detected_stains": [0, -1]}
    low = prediction_result(item, refer_threshold=0.6)
    assert low["score"] == "1+" and low["refer"] is True and low["scenario"] == "he_only"
    assert low["detected_stains"] == ["he"] and low["warnings"] == []
    assert prediction_result(item, refer_threshold=0.5)["refer"] is False
    assert math.isclose(low["confidence"], 0.5)
    with pytest.raises(ValueError, match="4 class probabilities"):
        prediction_result({**item, "pred": torch.tensor([0.5, 0.5])})
