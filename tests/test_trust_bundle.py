"""Trustworthy answers of the trained toy bundle: the calibration record, the evaluation report and its MLflow run,
and what ``predict`` answers for real slides from another lab and for images without tissue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_CONFIGS, run_bundle, tiny_overrides
from PIL import Image
from test_bundle_eval_infer import demo_dataset, deployed_bundle  # noqa: F401  (session fixture)

from her2_monai.calibration import read_calibration
from her2_monai.cli import main
from her2_monai.constants import CLASS_NAMES, SCENARIOS
from her2_monai.data.provenance import DEMO_WARNING
from her2_monai.inference.predictor import REFER_REASONS

pytestmark = pytest.mark.slow  # whole-bundle runs: evaluation, predictions, CAMs (seconds each on 2 CPU cores)


def _predict(capsys, bundle: Path, *args: str) -> tuple[int, dict | None, str]:
    code = main(["predict", *args, "--bundle", str(bundle), "--config_file", str(BUNDLE_CONFIGS / "inference.json")])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def _png_ok(path: Path, min_colours: int = 10) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100, path
        assert len(set(image.convert("L").getdata())) > min_colours, f"{path} looks blank"


def test_training_stores_a_calibration_record_with_the_model(deployed_bundle: Path) -> None:  # noqa: F811
    record = read_calibration(deployed_bundle / "models" / "model.pt")
    assert record is not None and record["temperature"] > 0
    assert set(record["refer_threshold"]) == set(SCENARIOS)
    for scenario in SCENARIOS:
        choice = record["refer"][scenario]
        assert choice["threshold"] == record["refer_threshold"][scenario]
        assert not choice["target_met"] or choice["accuracy"] >= record["refer"]["target_accuracy"]
        assert record["ood"]["validation_pass_rate"][scenario] >= 0.95  # >= 95% of validation cases pass
    assert record["ood"]["method"] == "image_stats" and set(record["ood"]["state"]["stains"]) == {"he", "ihc"}
    summary = json.loads((deployed_bundle / "eval" / "calibration.json").read_text())
    assert summary["temperature"] == record["temperature"] and "state" not in summary["ood"]
    # The weights still load with weights_only=True and the deployed model applies the temperature.
    from her2_monai.inference import HER2Deploy

    deploy = HER2Deploy.from_model_file(deployed_bundle / "models" / "model.pt")
    assert deploy.temperature == pytest.approx(record["temperature"]) and deploy.trust.has_ood
    x = torch.rand(2, 6, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = deploy.net.forward_available(x[:, :3], x[:, 3:], torch.ones(2, 2, dtype=torch.bool), True)["logits"]
        assert torch.allclose(deploy(x), raw / record["temperature"], atol=1e-5)


def test_calibrating_refits_the_record_without_touching_the_weights(deployed_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "bundle"
    shutil.copytree(deployed_bundle / "models", root / "models")
    shutil.copytree(deployed_bundle / "eval", root / "eval", ignore=shutil.ignore_patterns("mlruns*", "predictions"))
    before = torch.load(root / "models" / "model.pt", weights_only=True)
    run_bundle(
        ["train.json", "evaluate.json"],
        "calibrating",
        **tiny_overrides(root, deployed_bundle / "cache", refer_target_accuracy=0.25, ood_method="energy"),
    )
    after = torch.load(root / "models" / "model.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("_extra_state"))
    record = after["_extra_state"]["metadata"]["calibration"]
    assert record["refer"]["target_accuracy"] == 0.25 and record["ood"]["method"] == "energy"
    assert after["_extra_state"]["metadata"]["profile"] == "demo"  # the rest of the record is kept


def test_evaluation_writes_metrics_report_and_an_mlflow_run(deployed_bundle: Path) -> None:  # noqa: F811
    run_bundle(
        ["train.json", "evaluate.json"],
        "evaluating",
        **tiny_overrides(deployed_bundle, deployed_bundle / "cache", mc_dropout_passes=8),
    )
    eval_dir = deployed_bundle / "eval"
    report = json.loads((eval_dir / "metrics.json").read_text())
    record = read_calibration(deployed_bundle / "models" / "model.pt")
    assert report["calibration"]["temperature"] == pytest.approx(record["temperature"])
    for name in SCENARIOS:
        scenario = report["scenarios"][name]
        keys = {
            "accuracy",
            "macro_f1",
            "per_class",
            "confusion_matrix",
            "auc_0_vs_1plus",
            "ece",
            "ece_per_class",
            "referral",
            "ood",
        }
        assert keys <= set(scenario), name
        assert set(scenario["ece_per_class"]) == set(CLASS_NAMES) and 0.0 <= scenario["ece"] <= 1.0
        referral = scenario["referral"]
        assert referral["threshold"] == pytest.approx(record["refer_threshold"][name])
        assert referral["curve"]["coverage"][-1] == pytest.approx(1.0)
        assert 0.0 <= scenario["ood"]["pass_rate"] <= 1.0
        assert scenario["uncertainty"]["mc_dropout_passes"] == 8
        assert scenario["uncertainty"]["mutual_information_mean"] >= 0.0
    for direction in ("he_to_ihc", "ihc_to_he"):
        assert {"psnr", "ssim"} <= set(report["translation"][direction])
    attention = report["stain_attention"]["ihc_real_vs_synthetic"]
    assert attention["n_real"] == attention["n_synthetic"] == 4
    for name in ("confusion_matrices", "reliability_diagrams", "coverage_accuracy", "cam_gallery"):
        _png_ok(eval_dir / f"{name}.png")
    page = (eval_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("src='data:image/png;base64,") >= 5
    assert "src='http" not in page and "<script" not in page  # self-contained, no remote resources

    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{eval_dir / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    evaluation = next(r for r in runs if r.info.run_name == "her2-demo-evaluation")
    training = next(r for r in runs if r.info.run_name == "her2-demo-stage2-classifier")
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id == evaluation.data.tags["training_run_id"]
    metrics = evaluation.data.metrics
    assert metrics["scenarios.dual.accuracy"] == pytest.approx(report["scenarios"]["dual"]["accuracy"])
    assert metrics["calibration.temperature"] == pytest.approx(record["temperature"])
    assert "scenarios.dual.ece_per_class.1plus" in metrics
    # What the model was trained on: tags of the run, not metrics.
    assert evaluation.data.tags["her2_monai.training_data.source"] == "demo"
    assert evaluation.data.tags["her2_monai.warning"] == DEMO_WARNING
    assert not any(name.startswith("provenance") for name in metrics)
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"metrics.json", "report.html", "reliability_diagrams.png", "run_config_evaluation.json"} <= artifacts
    config = json.loads(
        Path(client.download_artifacts(evaluation.info.run_id, "run_config_evaluation.json")).read_text()
    )
    assert config["mc_dropout_passes"] == 8 and "evaluating" in config  # the resolved config, overrides applied
    assert "run_config.json" in {a.path for a in client.list_artifacts(training.info.run_id)}


def _check_trust_fields(result: dict) -> None:
    assert result["score"] in CLASS_NAMES and set(result["refer_reasons"]) <= set(REFER_REASONS)
    assert isinstance(result["ood_score"], float) and isinstance(result["ood_threshold"], float)
    assert ("out_of_distribution" in result["refer_reasons"]) == (result["ood_score"] > result["ood_threshold"])
    assert ("low_confidence" in result["refer_reasons"]) == (result["confidence"] < result["refer_threshold"])
    assert result["refer"] == bool(result["refer_reasons"]) and result["calibrated"] is True
    assert set(result["stain_attention"]) == {"he", "ihc"} and all(
        0 < w < 1 for w in result["stain_attention"].values()
    )


def test_predict_on_real_bci_and_mist_patches_reports_ood(capsys, deployed_bundle: Path, shared_data: Path) -> None:  # noqa: F811
    from her2_monai.inference import load_predictor

    bci = sorted((shared_data / "bci" / "HE" / "test").glob("*.png"))
    mist = sorted((shared_data / "mist" / "HE").glob("*.jpg"))
    pairs = [(he, shared_data / "bci" / "IHC" / "test" / he.name) for he in bci]
    pairs += [(he, shared_data / "mist" / "IHC" / he.name) for he in mist]
    assert len(pairs) >= 10
    for he, ihc in (pairs[0], pairs[-1]):  # the command line, on one BCI and one MIST pair
        code, result, _ = _predict(capsys, deployed_bundle, "--he", str(he), "--ihc", str(ihc))
        assert code == 0 and result["scenario"] == "dual"
        _check_trust_fields(result)
    predictor = load_predictor(deployed_bundle, BUNDLE_CONFIGS / "inference.json")  # the same path, loaded once
    scores = []
    for he, ihc in pairs:
        for inputs in ({"he": he, "ihc": ihc}, {"he": he}, {"image": ihc}):
            result = predictor.predict(**inputs)
            _check_trust_fields(result)
            scores.append(result["ood_score"])
    assert len(set(scores)) > len(pairs)  # a score per case, not a constant


def _no_tissue_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "blank": folder / "blank.png",
        "transparent": folder / "transparent.png",
        "tiny": folder / "tiny.png",
        "grey16": folder / "grey16.png",
    }
    Image.new("RGB", (512, 512), (255, 255, 255)).save(files["blank"])
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (256, 256, 3)), np.zeros((256, 256, 1))], axis=2).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(files["transparent"])  # coloured pixels, all fully transparent
    Image.new("RGB", (1, 1), (180, 60, 140)).save(files["tiny"])
    grey = (rng.random((256, 256)) * 65535).astype(np.uint16)
    Image.fromarray(grey).save(files["grey16"])  # 16-bit greyscale (mode I;16)
    return files


def test_images_without_tissue_get_no_her2_score(capsys, deployed_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    from her2_monai.inference import load_predictor

    files = _no_tissue_images(tmp_path / "inputs")
    with Image.open(files["grey16"]) as image:
        assert image.mode.startswith("I;16")
    expected = {"blank": "blank image", "transparent": "blank image", "tiny": "1x1 px", "grey16": "greyscale"}

    def refused(result: dict, name: str) -> None:
        assert result["score"] is None and result["probabilities"] is None and result["confidence"] is None
        assert result["refer"] is True and "no_tissue" in result["refer_reasons"], (name, result)
        assert any(expected[name] in w for w in result["warnings"]), (name, result["warnings"])

    for name, path in files.items():
        code, result, err = _predict(capsys, deployed_bundle, "--image", str(path))
        assert code == 0 and "no HER2 score" in err, name
        refused(result, name)
    predictor = load_predictor(deployed_bundle, BUNDLE_CONFIGS / "inference.json")
    real = demo_dataset(deployed_bundle) / "IHC" / "test" / "00019_test_2+.png"
    for name, path in files.items():
        refused(predictor.predict(he=path), name)
        refused(predictor.predict(ihc=path), name)
        refused(predictor.predict(he=path, ihc=real), name)  # one blank stain is enough to refuse the pair
    # Asking for an explanation of an image without tissue fails, naming why.
    code, _, err = _predict(
        capsys, deployed_bundle, "--image", str(files["blank"]), "--explain", str(tmp_path / "x.png")
    )
    assert code == 2 and "no stained tissue" in err and not (tmp_path / "x.png").exists()
    # The inference workflow (also what MONAI Label serves) refuses them the same way.
    out = tmp_path / "predictions"
    run_bundle(
        "inference.json",
        "inferring",
        bundle_root=str(deployed_bundle),
        dataset_dir=str(tmp_path / "inputs"),
        prediction_dir=str(out),
    )
    for name in files:
        pred = json.loads((out / f"{name}.json").read_text())
        assert pred["score"] is None and pred["refer_reasons"][0] == "no_tissue", name


def test_predict_explain_writes_an_overlay(capsys, deployed_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    data = demo_dataset(deployed_bundle)
    he, ihc = data / "HE" / "test" / "00019_test_2+.png", data / "IHC" / "test" / "00019_test_2+.png"
    out = tmp_path / "explain.png"
    code, result, err = _predict(capsys, deployed_bundle, "--he", str(he), "--ihc", str(ihc), "--explain", str(out))
    assert code == 0 and result["score"] in CLASS_NAMES and "explanation written" in err
    _png_ok(out)
    with Image.open(out) as image:
        assert image.width > 2 * image.height  # input + three CAM columns + the attention bars
    single = tmp_path / "single.png"
    code, _, _ = _predict(capsys, deployed_bundle, "--he", str(he), "--explain", str(single), "--cam", "gradcampp")
    assert code == 0
    _png_ok(single)
    code, _, err = _predict(capsys, deployed_bundle, "--he", str(he), "--explain", str(single), "--cam", "lime")
    assert code == 2 and "--cam must be one of" in err
