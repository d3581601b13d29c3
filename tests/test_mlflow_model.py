"""The deployed predictor as an MLflow pyfunc model: logged and registered by training and evaluation, loaded in a
fresh process, and served by ``mlflow models serve`` on loopback with the same answers as ``predict``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import BUNDLE_CONFIGS, pinned_fp32, run_bundle, tiny_overrides

mlflow = pytest.importorskip("mlflow")

from her2_monai.data.provenance import training_data  # noqa: E402
from her2_monai.serving.mlflow_model import (  # noqa: E402
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MODEL_SHA256_TAG,
    HER2PyfuncModel,
    _image_file,
)

pytestmark = pytest.mark.slow

NAME = "her2-monai"
STAGE1_RUN = "her2-demo-stage1-cmgan"
STAGE2_RUN = "her2-demo-stage2-classifier"
READY_TIMEOUT_S = 120.0
#: Same code, same float32 arithmetic on both sides: the probabilities agree to rounding.
PROBABILITY_TOLERANCE = 1e-6
COMPARED = ("score", "probabilities", "confidence", "refer", "refer_reasons", "scenario", "provenance", "calibrated")


def _store(root: Path) -> str:
    return f"sqlite:///{root / 'eval' / 'mlruns.db'}"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dual_case(root: Path) -> tuple[str, str]:
    datalist = json.loads((root / "eval" / "datalist.json").read_text())
    record = next(r for r in datalist["test"] if r.get("he") and r.get("ihc"))
    return record["he"], record["ihc"]


@pytest.fixture(scope="module")
def model_store(trained_bundle: Path, tmp_path_factory) -> Path:
    """A copy of the trained bundle whose own store holds the stage-2 run with its model, evaluated (version 1)."""
    root = tmp_path_factory.mktemp("mlflow_model") / "bundle"
    shutil.copytree(trained_bundle / "models", root / "models")
    (root / "eval").mkdir()
    shutil.copy2(trained_bundle / "eval" / "datalist.json", root / "eval" / "datalist.json")
    (root / "cache").symlink_to(trained_bundle / "cache", target_is_directory=True)
    run_bundle(
        ["train.json", "evaluate.json"],
        "evaluating",
        **tiny_overrides(root, root / "cache"),
        mc_dropout_passes=0,
        evaluation_run_name="copy-evaluation",
    )
    return root


def test_training_logs_and_registers_the_calibrated_predictor(trained_bundle: Path) -> None:
    """README command 1's stage 2: the model, its datasets and the experiment's kind are in the store."""
    client = mlflow.MlflowClient(tracking_uri=_store(trained_bundle))
    experiment = client.get_experiment_by_name("her2-monai")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND == "custom_model_development"
    run = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{STAGE2_RUN}'")[0]

    # The datalist as the run's datasets: one per split, with the hash and the counts of training_data().
    record = training_data(trained_bundle / "eval" / "datalist.json")
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert len(inputs) == 3
    for split, counts in record["splits"].items():
        found = next(i for name, i in inputs.items() if f"-{split}-" in name)
        tags = {t.key: t.value for t in found.tags}
        assert tags["datalist_sha256"] == record["datalist_sha256"]
        assert tags["mlflow.data.context"] == split
        assert int(tags["records"]) == counts["records"]
        assert {k: int(tags[f"classes.{k}"]) for k in counts["classes"]} == counts["classes"]
        assert {k: int(tags[f"stains.{k}"]) for k in counts["stains"]} == counts["stains"]
        assert json.loads(found.dataset.profile)["num_rows"] == counts["records"]

    # The CM-GAN stage trained on the same datalist's training and validation splits: its run shows them too.
    # (Other tests may train stage 1 again into this store later: take the stage-1 run of this training, the last one
    # started before its stage-2 run.)
    stage1_runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{STAGE1_RUN}'")
    stage1 = max((r for r in stage1_runs if r.info.start_time <= run.info.start_time), key=lambda r: r.info.start_time)
    stage1_inputs = {i.dataset.name: i for i in stage1.inputs.dataset_inputs}
    assert sorted(n.split("-")[1] for n in stage1_inputs) == ["training", "validation"]
    for found in stage1_inputs.values():
        assert {t.key: t.value for t in found.tags}["datalist_sha256"] == record["datalist_sha256"]

    # The registered version is this run's model of this model.pt, with its calibration in the metadata.
    digest = _sha256(trained_bundle / "models" / "model.pt")
    version = next(v for v in client.search_model_versions(f"name = '{NAME}'") if v.run_id == run.info.run_id)
    assert version.tags[MODEL_SHA256_TAG] == digest
    info = mlflow.models.get_model_info(f"models:/{NAME}/{version.version}")
    from her2_monai.calibration.record import read_calibration

    calibration = read_calibration(trained_bundle / "models" / "model.pt")
    assert info.metadata["model_sha256"] == digest
    assert info.metadata["calibration"]["temperature"] == pytest.approx(calibration["temperature"])
    assert info.metadata["calibration"]["refer_threshold"] == pytest.approx(calibration["refer_threshold"])
    assert info.metadata["provenance"]["datalist_sha256"] == record["datalist_sha256"][:12]
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["he", "ihc", "image"]
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # nothing pickled


def test_evaluation_logs_the_model_and_tags_the_version_with_its_metrics(model_store: Path) -> None:
    client = mlflow.MlflowClient(tracking_uri=_store(model_store))
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 1  # no stage-2 run in this store: the evaluation registered the model
    version = versions[0]
    report = json.loads((model_store / "eval" / "metrics.json").read_text())
    tags = version.tags
    assert tags[MODEL_SHA256_TAG] == _sha256(model_store / "models" / "model.pt")
    for scenario in ("dual", "he_only", "ihc_only"):
        assert float(tags[f"eval.scenarios.{scenario}.accuracy"]) == pytest.approx(
            report["scenarios"][scenario]["accuracy"], rel=1e-5
        )
    run = client.get_run(tags["eval.run_id"])
    assert run.info.run_name == "copy-evaluation" and version.run_id == run.info.run_id
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"evaluation"}
    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/requirements.txt")).read_text()
    lines = requirements.split()
    assert lines[0].startswith("her2-monai") and f"torch=={__import__('torch').__version__}" in lines
    assert f"mlflow=={mlflow.__version__}" in lines


def test_pyfunc_model_predicts_like_predict_in_a_fresh_process(model_store: Path, monkeypatch) -> None:
    he, ihc = _dual_case(model_store)
    script = textwrap.dedent(
        f"""
        import base64, json, mlflow, pandas as pd
        mlflow.set_tracking_uri({_store(model_store)!r})
        model = mlflow.pyfunc.load_model("models:/{NAME}/1")
        b64 = lambda p: base64.b64encode(open(p, "rb").read()).decode()
        frame = pd.DataFrame({{"he": [{he!r}, b64({he!r}), None], "ihc": [{ihc!r}, b64({ihc!r}), None],
                              "image": [None, None, {he!r}]}})
        print(json.dumps(model.predict(frame)))
        """
    )
    env = {**os.environ, "HER2_CPU_PRECISION": "fp32", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=model_store
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answers) == 3

    from her2_monai.inference import load_predictor

    with pinned_fp32(monkeypatch):  # the subprocess ran under the same execution settings
        predictor = load_predictor(model_store, BUNDLE_CONFIGS / "inference.json")
        expected = [predictor.predict(he=he, ihc=ihc), predictor.predict(he=he, ihc=ihc), predictor.predict(image=he)]
    for got, want in zip(answers, expected):
        _assert_same_answer(got, want)
    assert answers[0]["scenario"] == "dual" and answers[2]["scenario"] != "dual"


def _assert_same_answer(got: dict, want: dict) -> None:
    assert set(got) == set(json.loads(json.dumps(want)))
    for key in COMPARED:
        if key == "probabilities" and want[key] is not None:
            assert got[key] == pytest.approx(want[key], abs=PROBABILITY_TOLERANCE)
        elif key == "confidence" and want[key] is not None:
            assert got[key] == pytest.approx(want[key], abs=PROBABILITY_TOLERANCE)
        else:
            assert got[key] == json.loads(json.dumps(want[key])), key


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its workers (one process group, started by this test)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def test_served_model_answers_a_rest_request_like_predict(model_store: Path, monkeypatch) -> None:
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli) if mlflow_cli.is_file() else "mlflow", "models", "serve", "-m", f"models:/{NAME}/1"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=_store(model_store), HER2_CPU_PRECISION="fp32", OMP_NUM_THREADS="1")
    log_path = model_store.parent / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=model_store.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    he, ihc = _dual_case(model_store)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer in {READY_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        b64 = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in (he, ihc)]
        body = {"dataframe_split": {"columns": ["he", "ihc", "image"], "data": [[*b64, None]]}}
        request = urllib.request.Request(
            f"{base}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            served = json.loads(response.read())["predictions"]
        # Not an image: the server answers with an error, not a score.
        bad = {"dataframe_split": {"columns": ["he"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        request = urllib.request.Request(
            f"{base}/invocations", data=json.dumps(bad).encode(), headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code in (400, 500) and b"not a PNG, JPEG or TIFF" in err.value.read()
    finally:
        _stop(process)

    from her2_monai.inference import load_predictor

    with pinned_fp32(monkeypatch):
        expected = load_predictor(model_store, BUNDLE_CONFIGS / "inference.json").predict(he=he, ihc=ihc)
    assert len(served) == 1
    _assert_same_answer(served[0], expected)
    assert served[0]["score"] == expected["score"] and served[0]["scenario"] == "dual"


def test_pyfunc_input_cells_are_files_or_base64_images(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (4, 4), (200, 100, 150)).save(png)
    assert _image_file(str(png), tmp_path, "x") == str(png)
    assert _image_file(None, tmp_path, "x") is None and _image_file(float("nan"), tmp_path, "x") is None
    decoded = _image_file("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode(), tmp_path, "y")
    assert Path(decoded).read_bytes() == png.read_bytes() and decoded.endswith(".png")
    with pytest.raises(ValueError, match="not a PNG, JPEG or TIFF"):
        _image_file(base64.b64encode(b"GIF89a....").decode(), tmp_path, "z")
    with pytest.raises(ValueError, match="not a file on this machine nor base64"):
        _image_file(str(tmp_path / "missing.png"), tmp_path, "w")
    with pytest.raises(ValueError, match="unknown input columns"):
        HER2PyfuncModel().predict(None, {"slide": ["x"]})
