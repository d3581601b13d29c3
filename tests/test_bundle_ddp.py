"""Multi-GPU config on the CPU: torchrun with 2 gloo processes, both stages, rank-0-only outputs, synced metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE_CONFIGS, REPO_ROOT, bundle_component, scratch_folder, tiny_overrides

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
BATCH_SIZE = 2
STAGE_RUNS = {"her2-demo-stage0-selector", "her2-demo-stage1-cmgan", "her2-demo-stage2-classifier"}


@pytest.fixture(autouse=True)
def _one_thread():
    """The in-test evaluations run with one thread: a second busy OpenMP thread stalls on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(overrides: dict) -> list[str]:
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def ddp_run(request, tmp_path_factory):
    """Run ``torchrun --nproc_per_node=2 -m monai.bundle run training`` with the multi-GPU config, CPU only."""
    with scratch_folder(request, tmp_path_factory, "ddp_bundle") as root:
        overrides = tiny_overrides(root, root / "cache", batch_size=BATCH_SIZE, gan_batch_size=BATCH_SIZE)
        configs = str([str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "multi_gpu_train.json")])
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD_SIZE}",
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            configs,
            *_cli(overrides),
        ]
        # CPU + gloo even on a GPU machine; one thread per process (the machine is shared); no outside MLflow server.
        # Float32: the logged metrics are compared with a float32 evaluation in this process, and bf16 results would
        # differ with the batch split between the ranks (conftest: results must not depend on the CPU arithmetic).
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HER2_CPU_PRECISION": "fp32"}
        env.pop("MLFLOW_TRACKING_URI", None)
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{log[-6000:]}"
        yield root, overrides, log


def test_ddp_training_writes_unwrapped_weights_and_checkpoints_once(ddp_run):
    root, _, _ = ddp_run
    models = root / "models"
    for name in ("selector.pt", "cmgan.pt", "gan_checkpoint.pt", "model.pt", "classifier_checkpoint.pt"):
        assert (models / name).is_file(), name
    assert not [p.name for p in models.iterdir() if p.name.startswith(".")], "temporary checkpoint files left behind"
    # State dicts hold the plain networks (no DDP 'module.' prefix): interchangeable with single-process runs.
    generators = torch.load(models / "cmgan.pt", weights_only=True)
    assert generators and all(k.split(".")[0] in ("he_to_ihc", "ihc_to_he", "_extra_state") for k in generators)
    weights = torch.load(models / "model.pt", weights_only=True)
    assert weights and not any(k.startswith("module.") for k in weights)
    classifier = torch.load(models / "classifier_checkpoint.pt", weights_only=True)
    frozen = ("cmgan.", "selector.")  # referred to by file in the resume checkpoint, held in full by model.pt
    assert set(classifier["network"]) - {"__frozen_by_reference__"} == {k for k in weights if not k.startswith(frozen)}
    gan = torch.load(models / "gan_checkpoint.pt", weights_only=True)
    assert any(k.startswith("disc_ihc.") for k in gan["discriminators"])
    assert not any(k.startswith("module.") for k in [*gan["cmgan"], *gan["discriminators"]])
    # DistributedSampler: each process trains on its half of the data, so an epoch has half the single-process steps.
    datalist = json.loads((root / "eval" / "datalist.json").read_text())
    per_rank = -(-len(datalist["training"]) // WORLD_SIZE)
    assert classifier["trainer"]["iteration"] == per_rank // BATCH_SIZE
    assert gan["trainer"]["iteration"] == per_rank // BATCH_SIZE
    # Rank 0 alone writes the image grids.
    assert sorted(p.name for p in (root / "eval" / "translation_grids").iterdir()) == ["grid_epoch_001.png"]


def test_ddp_creates_one_mlflow_run_per_stage(ddp_run):
    mlflow = pytest.importorskip("mlflow")
    root, _, _ = ddp_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(STAGE_RUNS)  # no second run from rank 1
    assert all(r.info.status == "FINISHED" for r in runs)
    classifier = next(r for r in runs if r.info.run_name == "her2-demo-stage2-classifier")
    assert len(client.get_metric_history(classifier.info.run_id, "val_macro_f1")) == 1


def test_ddp_validation_metrics_equal_a_single_process_evaluation(ddp_run):
    """Sharded validation + summed metric states must give exactly the full-set metrics of rank 0's model."""
    mlflow = pytest.importorskip("mlflow")
    from monai.data import DataLoader, Dataset

    from her2_monai.data.datalist import load_datalist_split
    from her2_monai.engines.evaluators import ScenarioEvaluator
    from her2_monai.metrics import ScenarioClassificationMetric, psnr_ssim, to_uint8_images
    from her2_monai.networks.factory import build_model, frozen_cmgan

    root, overrides, log = ddp_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    logged = {r.info.run_name: r.data.metrics for r in client.search_runs([experiment.experiment_id])}
    datalist = root / "eval" / "datalist.json"
    preprocessing = bundle_component("train.json", "stain_preprocessing", image_size=overrides["image_size"])

    # Stage 1: PSNR/SSIM of the exported generators (validated after the last epoch) on the whole validation set.
    gan = frozen_cmgan(root / "models" / "cmgan.pt")
    pairs = load_datalist_split(datalist, "validation", require_both=True)
    assert len(pairs) >= WORLD_SIZE
    scores: dict[str, list[tuple[float, float]]] = {"he_to_ihc": [], "ihc_to_he": []}
    with torch.no_grad():
        for batch in DataLoader(Dataset(pairs, preprocessing), batch_size=len(pairs)):
            he, ihc = (batch[k].as_subclass(torch.Tensor).float() for k in ("he", "ihc"))
            for direction, fake, real in (("he_to_ihc", gan.he_to_ihc(he), ihc), ("ihc_to_he", gan.ihc_to_he(ihc), he)):
                scores[direction] += [psnr_ssim(f, r) for f, r in zip(to_uint8_images(fake), to_uint8_images(real))]
    stage1 = logged["her2-demo-stage1-cmgan"]
    for direction, values in scores.items():
        psnr, ssim = np.mean(values, axis=0)
        assert stage1[f"val_psnr_{direction}"] == pytest.approx(psnr, abs=1e-6)
        assert stage1[f"val_ssim_{direction}"] == pytest.approx(ssim, abs=1e-6)

    # Stage 2: the best classifier (model.pt, from the only epoch) on the whole validation set, every scenario.
    network = build_model(root / "models" / "model.pt")
    records = load_datalist_split(datalist, "validation", require_label=True)
    metrics = {
        "val_acc": ScenarioClassificationMetric("accuracy"),
        "val_acc_he_only": ScenarioClassificationMetric("accuracy", scenario="he_only"),
        "val_f1_ihc_only": ScenarioClassificationMetric("macro_f1", scenario="ihc_only"),
    }
    evaluator = ScenarioEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(records, preprocessing), batch_size=3),
        network=network,
        key_val_metric={"val_macro_f1": ScenarioClassificationMetric("macro_f1")},
        additional_metrics=metrics,
    )
    evaluator.run()
    stage2 = logged["her2-demo-stage2-classifier"]
    for name in ("val_macro_f1", *metrics):
        assert stage2[name] == pytest.approx(evaluator.state.metrics[name], abs=1e-9), name

    # Every rank computed the same (all-reduced) metrics: the two ranks' epoch summaries are identical lines.
    summaries = [line.strip() for line in re.findall(r"Epoch\[1\] Metrics -- (val_acc: .*)", log)]
    assert len(summaries) == WORLD_SIZE and len(set(summaries)) == 1
