"""Fault catalogue, runs (docs/reliability.md): a full disk during a checkpoint write, a failing MLflow store, and a
second training on the same bundle folder. (Kill -9 and resume: tests/test_reliability_kill.py.)"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS, REPO_ROOT, run_bundle, tiny_overrides
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from her2_monai import bundle_lock
from her2_monai.bundle_lock import LOCK_NAME, BundleLockedError, lock_bundle, unlock_bundle
from her2_monai.fileio import verify_checksum
from her2_monai.handlers import CheckpointHandler, ResumeCheckpointLoader, TrackingHandler
from her2_monai.handlers import tracking as tracking_module


# ------------------------------------------------------------------------------------------- disk full
class _Weights:
    def __init__(self, value: float, size: int) -> None:
        self.tensor = torch.full((size,), value)

    def state_dict(self) -> dict:
        return {"w": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        self.tensor = state["w"]


def test_a_write_that_the_file_system_refuses_keeps_the_previous_checkpoint(tmp_path):
    """The kernel refuses the write part-way (RLIMIT_FSIZE: EFBIG, as ENOSPC would on a full disk)."""
    path = tmp_path / "gan_checkpoint.pt"
    weights = _Weights(1.0, 64 * 1024)  # 256 KB
    saver = CheckpointHandler(path, {"weights": weights}, include_engine=True)
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch_length, engine.state.epoch, engine.state.iteration = 5, 1, 1, 1
    saver.attach(engine)
    saver(engine)
    before = path.read_bytes()

    weights.tensor = torch.full((4 * 64 * 1024,), 2.0)  # the next checkpoint is 1 MB
    engine.state.epoch = engine.state.iteration = 2
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, hard))
    try:
        with pytest.raises(OSError, match="could not write .*gan_checkpoint.pt.*the previous version is kept") as err:
            saver(engine)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert err.value.errno == errno.EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256"]  # no temporary file
    assert path.read_bytes() == before and verify_checksum(path)
    restored, fresh = _Weights(0.0, 1), Engine(lambda e, b: None)
    loader = ResumeCheckpointLoader(path, {"weights": restored})
    loader.attach(fresh)
    fresh.state.max_epochs = 5
    loader(fresh)
    assert fresh.state.epoch == 1 and torch.equal(restored.tensor, torch.full((64 * 1024,), 1.0))


# ----------------------------------------------------------------------------------------- MLflow fails
@pytest.fixture()
def fresh_tracking_state(monkeypatch):
    """Forget stores that failed in earlier tests (the record is per process)."""
    monkeypatch.setattr(tracking_module, "_FAILED_STORES", {})
    monkeypatch.setattr(tracking_module.LocalRunLog, "_open", {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_with_tracking(uri: str, root: Path) -> tuple[TrackingHandler, TrackingHandler]:
    """Two epochs of a toy trainer and its validator, each with a tracking handler for the same run."""
    trainer_handler = TrackingHandler(
        fallback_dir=str(root), tracking_uri=uri, experiment_name="e", run_name="stage", close_on_complete=True,
        experiment_param={"lr": 0.1}, output_transform=lambda out: out, tags={"her2_monai.warning": "demo data"},
    )  # fmt: skip
    val_handler = TrackingHandler(
        fallback_dir=str(root), tracking_uri=uri, experiment_name="e", run_name="stage", iteration_log=False
    )
    trainer, validator = Engine(lambda e, b: float(b)), Engine(lambda e, b: None)

    @validator.on(Events.EPOCH_COMPLETED)
    def score(engine):
        engine.state.metrics = {"val_f1": 0.5 + 0.1 * trainer.state.epoch}

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validator.run([0]))
    trainer_handler.attach(trainer)
    val_handler.attach(validator)
    trainer.run([1, 2, 3], max_epochs=2)
    return trainer_handler, val_handler


def _local_rows(root: Path, run: str = "stage") -> list[list[str]]:
    lines = (root / "mlflow_offline" / f"{run}.metrics.csv").read_text().splitlines()
    assert lines[0] == "metric,step,value,timestamp"
    return [line.split(",") for line in lines[1:]]


def _check_kept_locally(root: Path, caplog, store: str) -> None:
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "training goes on without MLflow" in message and store in message and "mlflow_offline" in message
    rows = _local_rows(root)
    assert [(r[0], r[1], float(r[2])) for r in rows if r[0] == "Loss"] == [
        ("Loss", str(i), float(v)) for i, v in zip(range(1, 7), [1, 2, 3, 1, 2, 3])
    ]
    assert [float(r[2]) for r in rows if r[0] == "val_f1"] == pytest.approx([0.6, 0.7])
    params = json.loads((root / "mlflow_offline" / "stage.params.json").read_text())["params"]
    assert params["lr"] == "0.1" and params["max_epochs"] == "2"
    assert params["tag.her2_monai.warning"] == "demo data"  # tags are kept with the parameters


def test_an_unreachable_tracking_server_gives_one_warning_and_local_metrics(tmp_path, caplog, fresh_tracking_state):
    uri = f"http://127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING):
        trainer_handler, val_handler = _train_with_tracking(uri, tmp_path)
    assert trainer_handler.offline and val_handler.offline
    _check_kept_locally(tmp_path, caplog, uri)


def test_a_read_only_store_gives_one_warning_and_local_metrics(tmp_path, caplog, fresh_tracking_state):
    db = tmp_path / "mlruns.db"
    sqlite3.connect(db).close()
    uri = f"sqlite:///file:{db}?mode=ro&uri=true"  # SQLite refuses every write, as on a read-only mount
    with caplog.at_level(logging.WARNING):
        _train_with_tracking(uri, tmp_path)
    _check_kept_locally(tmp_path, caplog, uri)


@pytest.mark.slow
def test_a_locked_store_gives_one_warning_and_local_metrics(tmp_path, caplog, fresh_tracking_state):
    """Another process holds the SQLite file locked (MLflow waits 20 s for it, once)."""
    db = tmp_path / "mlruns.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING):
            _train_with_tracking(f"sqlite:///{db}", tmp_path)
    finally:
        holder.close()
    _check_kept_locally(tmp_path, caplog, f"sqlite:///{db}")


def test_a_working_store_gets_everything_and_no_local_files(tmp_path, caplog, fresh_tracking_state):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with caplog.at_level(logging.WARNING, logger="her2_monai"):
        trainer_handler, _ = _train_with_tracking(uri, tmp_path)
    assert not trainer_handler.offline and not (tmp_path / "mlflow_offline").exists()
    assert not [r for r in caplog.records if r.name.startswith("her2_monai")]
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_f1")] == pytest.approx([0.6, 0.7])
    assert run.data.tags["her2_monai.warning"] == "demo data"


def test_the_private_seam_with_monai_is_the_one_the_tracking_handler_was_written_against() -> None:
    """TrackingHandler overrides ``_log_metrics`` and calls ``_parse_artifacts`` and ``_dispose_sqlite_store``.

    A MONAI release that renames them, changes their signatures, or stops sending the default epoch and iteration
    logs through ``_log_metrics`` would leave an offline run logging nowhere: it must fail here instead.
    """
    expected = {"_log_metrics": ["self", "metrics", "step"], "_parse_artifacts": ["self"]}
    expected["_dispose_sqlite_store"] = ["self"]
    for name, parameters in expected.items():
        method = getattr(MLFlowHandler, name, None)
        assert callable(method), f"MONAI's MLFlowHandler has no {name} any more: update TrackingHandler"
        assert list(inspect.signature(method).parameters) == parameters, f"{name} changed its signature"
    assert inspect.signature(MLFlowHandler._log_metrics).parameters["step"].default is None
    for name in ("_default_epoch_log", "_default_iteration_log"):
        assert "self._log_metrics(" in inspect.getsource(getattr(MLFlowHandler, name)), name
    assert TrackingHandler._log_metrics is not MLFlowHandler._log_metrics


def test_a_file_store_uri_is_still_a_configuration_error(tmp_path, fresh_tracking_state):
    with pytest.raises(ValueError, match="file store"):
        TrackingHandler(tracking_uri=f"file://{tmp_path}")


def test_a_training_stage_goes_on_when_the_server_is_down(tmp_path, capfd, fresh_tracking_state):
    uri = f"http://127.0.0.1:{_closed_port()}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_bundle("train.json", "train_selector", **tiny_overrides(tmp_path, tmp_path / "cache", tracking_uri=uri))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "models" / "selector.pt").is_file()
    output = capfd.readouterr()
    assert (output.out + output.err).count("training goes on without MLflow") == 1  # the bundle's logging.conf
    rows = _local_rows(tmp_path / "eval", "her2-demo-stage0-selector")
    assert {r[0] for r in rows} >= {"loss", "val_stain_accuracy"}
    params = json.loads((tmp_path / "eval" / "mlflow_offline" / "her2-demo-stage0-selector.params.json").read_text())
    assert params["params"]["profile"] == "demo" and params["artifacts"] == [
        str(tmp_path / "models" / "selector.pt"),
        str(tmp_path / "eval" / "run_config.json"),
    ]


# ------------------------------------------------------------------------------ one training per bundle
_TAKE_LOCK = "import sys; from her2_monai.bundle_lock import lock_bundle; lock_bundle(sys.argv[1]); print('locked')"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_second_training_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    assert lock_bundle(tmp_path) == tmp_path.resolve() / LOCK_NAME
    try:
        assert lock_bundle(tmp_path) is not None  # the same process may take it again (stages run one by one)
        second = _python(_TAKE_LOCK, str(tmp_path))
        assert second.returncode != 0 and "locked" not in second.stdout
        assert "BundleLockedError: another training is running on the bundle folder" in second.stderr
        assert f"pid {os.getpid()}" in second.stderr and "--bundle_root" in second.stderr
    finally:
        unlock_bundle(tmp_path)
    assert _python(_TAKE_LOCK, str(tmp_path)).stdout.strip() == "locked"  # released
    assert lock_bundle(tmp_path, enabled="false") is None


def test_a_lock_left_by_a_killed_training_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", _TAKE_LOCK + "; sys.stdout.flush(); import time; time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BundleLockedError, match=f"pid {holder.pid}"):
            lock_bundle(tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (tmp_path / (LOCK_NAME + ".owner")).is_file()  # what the killed process left behind
    try:
        with caplog.at_level(logging.WARNING, logger=bundle_lock.__name__):
            lock_bundle(tmp_path)
        assert f"left by pid {holder.pid}" in caplog.text and "ended without releasing it" in caplog.text
    finally:
        unlock_bundle(tmp_path)


@pytest.mark.slow
def test_the_training_command_refuses_a_bundle_folder_in_use(tmp_path):
    lock_bundle(tmp_path)
    try:
        overrides = tiny_overrides(tmp_path, tmp_path / "cache", tracker="none")
        args = [item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value))]
        config = str(BUNDLE_CONFIGS / "train.json")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        second = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, *args],
            capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT,
        )  # fmt: skip
    finally:
        unlock_bundle(tmp_path)
    assert second.returncode != 0
    assert "another training is running on the bundle folder" in second.stderr
    assert not (tmp_path / "eval" / "datalist.json").exists() and not (tmp_path / "models").exists()


def test_replace_folder_swaps_a_complete_folder_in_and_leaves_nothing_behind(tmp_path):
    from her2_monai.fileio import replace_folder

    final = tmp_path / "out"
    for generation in ("first", "second"):
        staging = tmp_path / f".out.{generation}.tmp"
        staging.mkdir()
        (staging / "result.txt").write_text(generation)
        assert replace_folder(staging, final, stale_suffix=".stale") == final
        assert (final / "result.txt").read_text() == generation
        assert not staging.exists()
    # the earlier folder was moved aside and removed, not merged into the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in final.iterdir()) == ["result.txt"]
