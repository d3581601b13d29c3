"""The BCI profile end to end on the six real BCI pairs: what a new user with a small real dataset runs.

A BCI-layout folder is made in a temporary directory from symbolic links to ``../shared/data/bci`` (all six pairs
under ``train/``, two of them again under ``test/``): full 1024 px JPEG-under-PNG files, read and resized as the
profile does. The profile runs at toy size (64 px, ResNet18/ResNet10, one epoch per stage, a small CM-GAN): the point
is the real-file path and the behaviour on a small dataset, not accuracy.

* the default batch size (8) with 4 training pairs left after validation: the run caps the batch size in one visible
  line and writes every model file (``selector.pt``, ``cmgan.pt``, ``model.pt``); evaluation writes ``metrics.json``;
  ``predict`` answers on a real pair; the MLflow record holds the three stages with their parameters, metrics and
  artifacts;
* ``--batch_size 2`` trains two batches per epoch;
* a split that leaves nothing to validate exits non-zero before training, naming the counts and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS, REPO_ROOT, run_bundle, scratch_folder
from test_bundle_training import CLS_METRICS, CLS_VAL_METRICS, GAN_METRICS, GAN_VAL_METRICS

pytestmark = pytest.mark.slow

#: The BCI profile (selected by --dataset_dir) shrunk to seconds per stage; inputs stay the real 1024 px files.
SMOKE = {
    "gan_epochs": 1,
    "cls_epochs": 1,
    "image_size": 64,
    "gan_crop_size": 32,
    "gan_ngf": 16,
    "gan_n_blocks": 2,
    "gan_ndf": 16,
    "shared_backbone": "resnet18",
    "specific_backbone": "resnet10",
    "selector_epochs": 1,
    "selector_steps_per_epoch": 2,
}
TEST_PAIRS = ("00007_test_1+", "00118_test_0")


def bci_layout(shared_data: Path, root: Path, train: list[str], test: list[str]) -> Path:
    """A BCI-layout folder of symbolic links to the real pairs: ``{HE,IHC}/{train,test}/<name>.png``."""
    for stain in ("HE", "IHC"):
        for split, names in (("train", train), ("test", test)):
            folder = root / stain / split
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                (folder / f"{name}.png").symlink_to(shared_data / "bci" / stain / "test" / f"{name}.png")
    return root


def _env(tmp: Path) -> dict[str, str]:
    """A clean environment: CPU, an empty torch hub cache (so 'auto' finds no ImageNet weights), no outside MLflow."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCH_HOME": str(tmp / "torch_home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _bundle(run_id: str, configs: list[str], overrides: dict, env: dict) -> subprocess.CompletedProcess:
    files = str([str(BUNDLE_CONFIGS / c) for c in configs])
    args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def real_run(request, shared_data, tmp_path_factory):
    """``run training`` with the BCI profile on the six real pairs and the default batch size, then ``evaluating``."""
    with scratch_folder(request, tmp_path_factory, "real_bci") as tmp:
        names = sorted(p.stem for p in (shared_data / "bci" / "HE" / "test").iterdir())
        dataset = bci_layout(shared_data, tmp / "bci", train=names, test=list(TEST_PAIRS))
        overrides = {"dataset_dir": dataset, "bundle_root": tmp / "bundle", **SMOKE}
        env = _env(tmp)
        done = _bundle("training", ["train.json"], overrides, env)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-6000:]
        evaluated = _bundle("evaluating", ["train.json", "evaluate.json"], overrides, env)
        assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-6000:]
        yield tmp, dataset, log, env


def test_default_batch_size_on_six_pairs_is_capped_visibly_and_every_model_is_written(real_run):
    tmp, dataset, log, _ = real_run
    models = tmp / "bundle" / "models"
    for name in ("selector.pt", "cmgan.pt", "model.pt"):
        assert (models / name).is_file(), name
    # 6 pairs: validation takes one of each class with two pairs (1+, 3+); 4 stay for training, fewer than 8.
    assert (
        "stage 2 (classifier): 4 training labelled records are fewer than --batch_size 8; training with batch size 4"
        in log
    )
    assert "validation drawn patch by patch" in log and "class 0: 1 training record(s) and none in validation" in log
    assert "pretrained weights: none in the torch hub cache" in log
    checkpoint = torch.load(models / "classifier_checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 1  # one batch of 4: the stage trained, it was not skipped
    record = torch.load(models / "model.pt", weights_only=True)["_extra_state"]
    assert record["metadata"]["profile"] == "bci" and record["metadata"]["image_size"] == 64
    assert record["metadata"]["pretrained"].startswith("shared resnet18: random weights:")
    # Trained on a dataset folder, not the demo: recorded so, and the evaluation carries no demo warning.
    training_data = record["metadata"]["training_data"]
    assert training_data["source"] == "dataset" and training_data["dataset_dir"] == str(dataset)
    assert training_data["splits"]["training"]["records"] == 4 and training_data["splits"]["test"]["records"] == 2
    metrics = json.loads((tmp / "bundle" / "eval" / "metrics.json").read_text())
    assert metrics and (tmp / "bundle" / "eval" / "confusion_matrices.png").is_file()
    assert metrics["provenance"]["source"] == "dataset" and metrics["provenance"]["warnings"] == []


def test_predict_answers_on_a_real_pair(real_run, shared_data, capsys):
    from her2_monai.cli import main

    tmp = real_run[0]
    he, ihc = (shared_data / "bci" / stain / "test" / "00052_test_3+.png" for stain in ("HE", "IHC"))
    bundle = ["--bundle", str(tmp / "bundle"), "--config_file", str(BUNDLE_CONFIGS / "inference.json")]
    assert main(["predict", "--he", str(he), "--ihc", str(ihc), *bundle]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["scenario"] == "dual" and answer["score"] in ("0", "1+", "2+", "3+")
    assert len(answer["probabilities"]) == 4 and abs(sum(answer["probabilities"]) - 1) < 1e-4


def test_the_mlflow_record_of_the_real_run_is_complete(real_run):
    mlflow = pytest.importorskip("mlflow")
    tmp, dataset, _, _ = real_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'bundle' / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    stages = {"her2-bci-stage0-selector", "her2-bci-stage1-cmgan", "her2-bci-stage2-classifier"}
    assert set(runs) == stages | {"her2-bci-evaluation"}  # the smoke run also evaluates the model
    selector, gan, cls = (runs[f"her2-bci-stage{s}"] for s in ("0-selector", "1-cmgan", "2-classifier"))
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    for run in (selector, gan, cls):
        params = run.data.params
        assert params["profile"] == "bci" and params["dataset_dir"] == str(dataset)
        assert params["image_size"] == "64" and params["batch_size"] == "8"
        assert params["pretrained"].startswith("shared resnet18: random weights")
    assert {"loss", "val_stain_accuracy"} <= set(selector.data.metrics)
    assert GAN_METRICS | GAN_VAL_METRICS <= set(gan.data.metrics)
    assert CLS_METRICS | CLS_VAL_METRICS <= set(cls.data.metrics)
    assert "selector.pt" in {a.path for a in client.list_artifacts(selector.info.run_id)}
    assert {"cmgan.pt", "datalist.json", "grid_epoch_001.png"} <= {
        a.path for a in client.list_artifacts(gan.info.run_id)
    }
    assert {"model.pt", "datalist.json"} <= {a.path for a in client.list_artifacts(cls.info.run_id)}


def test_six_real_pairs_with_batch_size_2_train_two_batches(real_run, tmp_path, caplog):
    tmp, dataset, _, _ = real_run
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    for name in ("selector.pt", "cmgan.pt"):  # stage 2 alone, on the stage-0/1 weights of the real run
        shutil.copy(tmp / "bundle" / "models" / name, root / "models" / name)
    overrides = {**SMOKE, "dataset_dir": str(dataset), "bundle_root": str(root), "batch_size": 2, "tracker": "none"}
    with caplog.at_level("WARNING"):
        run_bundle("train.json", "train_classifier", **overrides)
    assert "fewer than --batch_size" not in caplog.text
    checkpoint = torch.load(root / "models" / "classifier_checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2 and (root / "models" / "model.pt").is_file()


def test_a_split_with_nothing_to_validate_exits_non_zero_before_training(shared_data, tmp_path):
    names = sorted(p.stem for p in (shared_data / "bci" / "HE" / "test").iterdir())
    dataset = bci_layout(shared_data, tmp_path / "bci", train=names, test=list(TEST_PAIRS))
    overrides = {"dataset_dir": dataset, "bundle_root": tmp_path / "bundle", **SMOKE, "val_fraction": 0.0}
    done = _bundle("training", ["train.json"], overrides, _env(tmp_path))
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "stage 1 (CM-GAN) would validate on zero samples" in log
    assert "6 training and 0 validation H&E/IHC pairs" in log and "raise --val_fraction" in log
    assert not (tmp_path / "bundle" / "models" / "selector.pt").exists()  # it failed before training anything
