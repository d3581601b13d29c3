"""Resuming a killed training run (``--resume true``) and checkpoints that a failure never leaves half-written."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import BUNDLE_CONFIGS, REPO_ROOT, run_bundle, tiny_overrides
from ignite.engine import Engine

from her2_monai.fileio import verify_checksum
from her2_monai.handlers import CheckpointHandler, ResumeCheckpointLoader

EPOCHS = 3
CLASSIFIER_RUN = "her2-demo-stage2-classifier"
KILL_DEADLINE_S = 300


def _cli(overrides: dict) -> list[str]:
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def _classifier_command(overrides: dict) -> list[str]:
    config = str(BUNDLE_CONFIGS / "train.json")
    return [sys.executable, "-m", "monai.bundle", "run", "train_classifier", "--config_file", config, *_cli(overrides)]


def _trainer_state(path) -> dict:
    return dict(torch.load(path, weights_only=True, mmap=True)["trainer"])


def _classifier_runs(root) -> tuple[list, object]:
    """The stage-2 MLflow runs of the bundle at ``root`` and a client of its store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == CLASSIFIER_RUN], client


@pytest.mark.slow
def test_killed_classifier_run_resumes_from_its_last_checkpoint(tmp_path):
    pytest.importorskip("mlflow")
    overrides = tiny_overrides(tmp_path, tmp_path / "cache", cls_epochs=EPOCHS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second busy OpenMP thread slows everything down on the shared 2-core machine
    try:
        run_bundle("train.json", "train_selector", **overrides)  # stages 0 and 1 (in-process): what stage 2 loads
        run_bundle("train.json", "train_gan", **overrides)
    finally:
        torch.set_num_threads(threads)
    models = tmp_path / "models"
    checkpoint = models / "classifier_checkpoint.pt"
    assert (models / "cmgan.pt").is_file() and not checkpoint.exists()
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"

    # 1. Start stage 2 and SIGKILL it as soon as the first epoch's checkpoint has been written.
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(
            _classifier_command(overrides), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + KILL_DEADLINE_S
        while not checkpoint.is_file():
            if process.poll() is not None:
                pytest.fail(f"run ended ({process.returncode}) before its first checkpoint:\n{_tail(tmp_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {KILL_DEADLINE_S} s:\n{_tail(tmp_path)}")
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed; raise EPOCHS"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    killed = _trainer_state(checkpoint)
    saved_epoch = killed["iteration"] // killed["epoch_length"]
    assert killed["iteration"] % killed["epoch_length"] == 0 and 1 <= saved_epoch < EPOCHS
    runs, _ = _classifier_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"  # killed: MLflow never heard that it ended
    killed_run_id = runs[0].info.run_id

    # 2. The same command with --resume true finishes the run from the saved epoch.
    resumed = subprocess.run(
        _classifier_command({**overrides, "resume": "true"}),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    match = re.search(r"resumed from (\S+) at epoch (\d+)", log)
    assert match and match.group(1) == str(checkpoint) and int(match.group(2)) == saved_epoch
    validated = [int(e) for e in re.findall(r"Epoch\[(\d+)\] Metrics -- val_", log)]
    assert validated == list(range(saved_epoch + 1, EPOCHS + 1))  # only the epochs that were left

    final = _trainer_state(checkpoint)
    assert final["max_epochs"] == EPOCHS and final["epoch_length"] == killed["epoch_length"]
    assert final["iteration"] == EPOCHS * final["epoch_length"]
    assert (models / "model.pt").is_file()
    assert not [p.name for p in models.iterdir() if p.name.startswith(".")], "temporary files left behind"
    best = torch.load(checkpoint, weights_only=True, mmap=True)["best"]["_saved"]
    assert len(best) == 1 and 0.0 <= best[0][0] <= 1.0  # ignite's record of the best score: [(score, name)]

    # 3. MONAI's MLFlowHandler picks up the unfinished run of the same name: one run, continued, then finished.
    runs, client = _classifier_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [killed_run_id] and runs[0].info.status == "FINISHED"
    val_steps = sorted(m.step for m in client.get_metric_history(killed_run_id, "val_macro_f1"))
    assert sorted(set(val_steps)) == list(range(1, EPOCHS + 1))
    assert all(val_steps.count(step) == 1 for step in range(1, saved_epoch + 1))  # not trained twice
    loss_steps = {m.step for m in client.get_metric_history(killed_run_id, "loss")}
    assert loss_steps == set(range(1, final["iteration"] + 1))


def _tail(root) -> str:
    return (root / "killed.log").read_text()[-4000:]


# ------------------------------------------------------------------------------------------- atomic checkpoints
class _Counter:
    """A minimal object with a state dict."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": torch.tensor(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


def _engine(epochs_done: int, epoch_length: int = 3, max_epochs: int = 5) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch_length = max_epochs, epoch_length
    engine.state.epoch, engine.state.iteration = epochs_done, epochs_done * epoch_length
    return engine


def test_failed_save_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "classifier_checkpoint.pt"
    counter = _Counter(1)
    saver = CheckpointHandler(path, {"counter": counter}, include_engine=True)
    engine = _engine(epochs_done=1)
    saver.attach(engine)
    saver(engine)
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(3)}, f)  # bytes reach the disk, then the write fails
        f.write(b"garbage")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    counter.value = 2
    engine.state.epoch, engine.state.iteration = 2, 6
    with pytest.raises(OSError, match="could not write .*No space left on device.*the previous version is kept"):
        saver(engine)
    monkeypatch.undo()

    # no temporary file remains; the previous file and its checksum are intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256"]
    assert path.read_bytes() == before and verify_checksum(path)
    restored, fresh = _Counter(0), Engine(lambda e, b: None)
    loader = ResumeCheckpointLoader(path, {"counter": restored})
    loader.attach(fresh)
    fresh.state.max_epochs = 5
    loader(fresh)
    assert restored.value == 1 and fresh.state.epoch == 1 and fresh.state.iteration == 3


def test_best_model_is_written_only_when_the_score_improves_and_survives_a_resume(tmp_path):
    path = tmp_path / "model.pt"
    counter = _Counter(0)
    best = CheckpointHandler(path, {"model": counter}, score_name="f1")
    engine = _engine(epochs_done=1)
    for epoch, (score, value) in enumerate(((0.5, 1), (0.4, 2), (0.7, 3)), start=1):
        engine.state.epoch, engine.state.metrics, counter.value = epoch, {"f1": score}, value
        best(engine)
        assert int(torch.load(path, weights_only=True)["value"]) == (1 if epoch < 3 else 3)
    # The record of the best score travels in the resume checkpoint: a resumed run does not save a worse model.
    resumed = CheckpointHandler(path, {"model": counter}, score_name="f1")
    resumed.load_state_dict(best.state_dict())
    engine.state.epoch, engine.state.metrics, counter.value = 4, {"f1": 0.6}, 4
    resumed(engine)
    assert int(torch.load(path, weights_only=True)["value"]) == 3


def test_savers_remove_leftovers_of_a_killed_save(tmp_path):
    path = tmp_path / "classifier_checkpoint.pt"
    leftover = tmp_path / f".{path.name}.abc123.tmp"  # what an atomic write leaves when SIGKILLed mid-write
    leftover.write_bytes(b"partial")
    unrelated = tmp_path / ".model.pt.xyz.tmp"
    unrelated.write_bytes(b"other file's leftover")
    CheckpointHandler(path, {"counter": _Counter(0)})
    assert not leftover.exists() and unrelated.exists()


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    engine = Engine(lambda e, b: None)
    with caplog.at_level("WARNING"):
        ResumeCheckpointLoader(tmp_path / "c.pt", {"counter": _Counter(0)}).attach(engine)
    assert "starting from scratch" in caplog.text


def test_resume_past_max_epochs_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    saver = CheckpointHandler(path, {"counter": _Counter(1)}, include_engine=True)
    engine = _engine(epochs_done=4)
    saver.attach(engine)
    saver(engine)
    fresh = Engine(lambda e, b: None)
    fresh.state.max_epochs = 2
    loader = ResumeCheckpointLoader(path, {"counter": _Counter(0)})
    loader.attach(fresh)
    with pytest.raises(ValueError, match="max_epochs"):
        loader(fresh)


def test_resume_with_an_optimizer_over_other_parameters_names_the_file_and_the_fix(tmp_path):
    # A run started with some layers frozen, resumed with them trainable (e.g. hybrid_unfreezing true -> auto).
    path = tmp_path / "classifier_checkpoint.pt"
    net = torch.nn.Linear(3, 2)
    frozen_run = torch.optim.AdamW([net.weight], lr=1e-3)
    saver = CheckpointHandler(path, {"optimizer": frozen_run}, include_engine=True)
    engine = _engine(epochs_done=1)
    saver.attach(engine)
    saver(engine)
    fresh = Engine(lambda e, b: None)
    fresh.state.max_epochs = 5
    loader = ResumeCheckpointLoader(path, {"optimizer": torch.optim.AdamW(net.parameters(), lr=1e-3)})
    loader.attach(fresh)
    with pytest.raises(ValueError, match=r"resume from .*classifier_checkpoint\.pt.*different set of parameters"):
        loader(fresh)
