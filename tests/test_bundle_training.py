"""The training bundle end to end at toy size: all stages, checkpoints, MLflow tracking, stage separation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS, run_bundle, tiny_overrides

from her2_monai.transforms import MIN_TISSUE_FRACTION

GAN_METRICS = {"g_loss", "d_loss", "g_adv", "ihc_l1_full", "ihc_l1_half", "he_l1_full", "he_l1_half"}
GAN_VAL_METRICS = {"val_psnr_he_to_ihc", "val_ssim_he_to_ihc", "val_psnr_ihc_to_he", "val_ssim_ihc_to_he"}
CLS_METRICS = {"loss", "ce", "dao", "dco"}
CLS_VAL_METRICS = {
    "val_macro_f1",
    "val_acc",
    "val_acc_dual",
    "val_acc_he_only",
    "val_acc_ihc_only",
    "val_f1_dual",
    "val_f1_he_only",
    "val_f1_ihc_only",
}


def test_training_writes_weights_checkpoints_and_datalist(trained_bundle):
    models = trained_bundle / "models"
    for name in ("selector.pt", "cmgan.pt", "gan_checkpoint.pt", "model.pt", "classifier_checkpoint.pt"):
        assert (models / name).is_file(), name
    generators = torch.load(models / "cmgan.pt", weights_only=True)
    assert generators and all(k.split(".")[0] in ("he_to_ihc", "ihc_to_he", "_extra_state") for k in generators)
    assert (
        generators["_extra_state"]["arguments"]["ngf"] == 8 and generators["_extra_state"]["class"] == "CrossModalGAN"
    )
    checkpoint = torch.load(models / "classifier_checkpoint.pt", weights_only=True)
    assert {"trainer", "network", "optimizer", "lr_scheduler", "best"} <= set(checkpoint)
    assert checkpoint["trainer"]["max_epochs"] == 1 and checkpoint["trainer"]["iteration"] == 3  # 12 pairs / batch 4
    # model.pt is the classifier with its frozen CM-GAN and selector, and the record of how they were built.
    weights = torch.load(models / "model.pt", weights_only=True)
    record = weights.pop("_extra_state")
    assert record["class"] == "HER2FlexibleNet" and record["arguments"]["shared_backbone"] == "resnet18"
    calibration = record["metadata"].pop("calibration")  # fitted on validation when stage 2 ends
    assert record["metadata"].pop("training_data")["source"] == "demo"  # tests/test_provenance.py checks the rest
    pretrained = "shared resnet18: random weights; specific resnet10: random weights"
    expected = {
        "profile": "demo",
        "image_size": 32,
        "model": "her2net",
        "pretrained": pretrained,
        "min_tissue_fraction": MIN_TISSUE_FRACTION,  # the input checks' threshold, recorded for inference
    }
    assert record["metadata"] == {**expected, "stain_normalization": None}
    assert calibration["temperature"] > 0 and set(calibration["refer_threshold"]) == {"dual", "he_only", "ihc_only"}
    assert weights["cmgan._extra_state"]["class"] == "CrossModalGAN"
    assert weights["selector._extra_state"]["class"] == "BranchSelector"
    assert all(isinstance(v, torch.Tensor) for k, v in weights.items() if not k.endswith("_extra_state"))
    # The resume checkpoint holds the network without its frozen CM-GAN and selector, which it refers to by file and
    # SHA-256 (see her2_monai.handlers.FrozenByReference); the best model holds everything.
    network, full = dict(checkpoint["network"]), torch.load(models / "model.pt", weights_only=True)
    references = network.pop("__frozen_by_reference__")
    assert {name: Path(ref["path"]).name for name, ref in references.items()} == {
        "cmgan": "cmgan.pt",
        "selector": "selector.pt",
    }
    assert network.keys() == {k for k in full if not k.startswith(("cmgan.", "selector."))}
    datalist = json.loads((trained_bundle / "eval" / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == 16 and len(datalist["test"]) == 4
    assert sorted(p.name for p in (trained_bundle / "eval" / "translation_grids").iterdir()) == ["grid_epoch_001.png"]


def test_mlflow_store_holds_both_stages_with_metrics_and_artifacts(trained_bundle):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained_bundle / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    stages = {"her2-demo-stage0-selector", "her2-demo-stage1-cmgan", "her2-demo-stage2-classifier"}
    assert stages <= set(runs) <= stages | {"her2-demo-evaluation"}  # evaluation tests may have logged their run
    selector, gan, cls = (runs[f"her2-demo-stage{i}"] for i in ("0-selector", "1-cmgan", "2-classifier"))
    assert {r.info.status for r in (selector, gan, cls)} == {"FINISHED"}
    assert {"loss", "val_stain_accuracy"} <= set(selector.data.metrics)
    assert "selector.pt" in {a.path for a in client.list_artifacts(selector.info.run_id)}
    assert GAN_METRICS | GAN_VAL_METRICS <= set(gan.data.metrics)
    assert CLS_METRICS | CLS_VAL_METRICS <= set(cls.data.metrics)
    assert gan.data.params["image_size"] == "32" and cls.data.params["missing_strategy"] == "cmgan"
    # per-iteration logging: one g_loss point per iteration of the single epoch
    assert len(client.get_metric_history(gan.info.run_id, "g_loss")) >= 2
    gan_artifacts = {a.path for a in client.list_artifacts(gan.info.run_id)}
    assert {"cmgan.pt", "datalist.json", "grid_epoch_001.png"} <= gan_artifacts
    assert {"model.pt", "datalist.json", "calibration.json", "run_config.json"} <= {
        a.path for a in client.list_artifacts(cls.info.run_id)
    }


def test_classifier_stage_alone_explains_a_missing_gan(tmp_path):
    with pytest.raises(Exception) as err:
        run_bundle("train.json", "train_classifier", **tiny_overrides(tmp_path, tmp_path / "cache"))
    chain, message = err.value, ""
    while chain is not None:
        message += str(chain)
        chain = chain.__cause__
    assert "stage-1 CM-GAN weights not found" in message and "run train_gan" in message


def test_training_workflows_have_monai_bundle_properties(tmp_path):
    """MONAI's property checks (used by MONAI Label and model-zoo tooling) pass for the training workflows."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"),
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **tiny_overrides(tmp_path, tmp_path / "cache"),
    )
    workflow.initialize()  # prepares the (tiny) demo datalist: building the trainer reads it
    assert workflow.check_properties() == []
    assert workflow.parser["train#trainer#max_epochs"] == "@cls_epochs"
    assert workflow.max_epochs == 1 and workflow.train_dataset is not None


def test_single_process_configs_carry_no_rank_logic():
    text = "".join((BUNDLE_CONFIGS / f).read_text() for f in ("train.json", "evaluate.json", "inference.json"))
    for word in ("rank", "is_main_process", "distributed", "barrier"):
        assert word not in text, word


def test_early_stopping_on_validation_macro_f1_is_wired_to_the_trainer(tmp_path):
    from monai.bundle import ConfigWorkflow
    from monai.handlers import EarlyStopHandler

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"),
        logging_file=False,
        workflow_type="train",
        **tiny_overrides(tmp_path, tmp_path / "cache", early_stop_patience=2),
    )
    workflow.initialize()
    workflow.parser.get_parsed_content("stop_early")
    handler = workflow.parser.get_parsed_content("validate#early_stop")
    assert isinstance(handler, EarlyStopHandler) and handler.patience == 2
    assert handler._handler.trainer is workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.has_event_handler(handler)
    engine = type("E", (), {"state": type("S", (), {"metrics": {"val_macro_f1": 0.7}})()})()
    assert handler.score_function(engine) == 0.7
    # --early_stop_patience 0 turns it off.
    off = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"),
        logging_file=False,
        workflow_type="train",
        **tiny_overrides(tmp_path / "off", tmp_path / "cache", early_stop_patience="0"),
    )
    off.initialize()
    assert off.parser.get_parsed_content("stop_early") is None
    assert not any(
        isinstance(h, EarlyStopHandler) for h in off.parser.get_parsed_content("validate#evaluator#val_handlers")
    )
