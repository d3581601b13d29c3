"""The bundle's MLflow store served by a real ``mlflow server`` on loopback, read through the REST API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXPERIMENT = "her2-monai"
CLASSIFIER_RUN = "her2-demo-stage2-classifier"
CLASSIFIER_METRICS = {"loss", "ce", "dao", "dco", "val_macro_f1", "val_acc", "val_acc_dual", "val_f1_he_only"}
READY_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_command() -> list[str]:
    executable = Path(sys.executable).with_name("mlflow")
    return [str(executable)] if executable.is_file() else [shutil.which("mlflow") or "mlflow"]


def _request(base: str, path: str, params: dict | None = None, body: dict | None = None, timeout: float = 10.0):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"{}")


def _wait_until_ready(process: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not ready after {READY_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and the uvicorn worker it spawned (one process group, started by this test)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def mlflow_server(trained_bundle, tmp_path_factory):
    """``mlflow server`` over the trained bundle's ``eval/mlruns.db``; yields its base URL."""
    pytest.importorskip("mlflow")
    workdir = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    command = [
        *_mlflow_command(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{trained_bundle / 'eval' / 'mlruns.db'}",
        "--default-artifact-root",
        str(trained_bundle / "eval" / "mlruns"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--allowed-hosts",
        f"127.0.0.1:{port},localhost:{port}",
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(process, base, log_path)
        yield base
    finally:
        _stop(process)


def test_server_serves_the_classifier_run_metrics(mlflow_server, trained_bundle):
    status, body = _request(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": EXPERIMENT})
    assert status == 200 and body["experiment"]["name"] == EXPERIMENT
    experiment_id = body["experiment"]["experiment_id"]

    status, body = _request(
        mlflow_server,
        "/api/2.0/mlflow/runs/search",
        body={"experiment_ids": [experiment_id], "filter": f"attributes.run_name = '{CLASSIFIER_RUN}'"},
    )
    assert status == 200 and len(body["runs"]) == 1
    run = body["runs"][0]
    assert run["info"]["run_name"] == CLASSIFIER_RUN and run["info"]["status"] == "FINISHED"
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert CLASSIFIER_METRICS <= set(latest)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["missing_strategy"] == "cmgan" and params["image_size"] == "32"

    # The served values are the training run's: best validation macro-F1 (one epoch) and one loss point per iteration.
    checkpoint = torch.load(trained_bundle / "models" / "classifier_checkpoint.pt", weights_only=True, mmap=True)
    best_score = checkpoint["best"]["_saved"][0][0]  # ignite's Checkpoint record: [(score, file name)]
    assert latest["val_macro_f1"] == pytest.approx(best_score, abs=1e-9)
    assert 0.0 <= latest["val_acc"] <= 1.0
    run_id = run["info"]["run_id"]
    query = {"run_id": run_id, "metric_key": "loss"}
    status, body = _request(mlflow_server, "/api/2.0/mlflow/metrics/get-history", query)
    assert status == 200
    history = body["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, checkpoint["trainer"]["iteration"] + 1))
    assert all(m["value"] > 0 for m in history)

    # The REST answers match the store read directly.
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained_bundle / 'eval' / 'mlruns.db'}")
    direct = client.get_run(run_id).data.metrics
    assert {k: latest[k] for k in CLASSIFIER_METRICS} == pytest.approx({k: direct[k] for k in CLASSIFIER_METRICS})


def test_server_answers_unknown_experiment_with_an_error(mlflow_server):
    with pytest.raises(urllib.error.HTTPError) as err:
        _request(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": "no-such-experiment"})
    assert err.value.code == 404
    assert json.loads(err.value.read())["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_server_rejects_a_foreign_host_header(mlflow_server):
    """``--allowed-hosts`` is in force: a request naming another host (DNS rebinding) is refused."""
    url = f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}"
    request = urllib.request.Request(url, headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 403
