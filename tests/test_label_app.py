"""The MONAI Label app (``her2_monai/label_app``) against a real ``monailabel start_server`` on loopback.

The server runs the tiny trained bundle of the test session as a subprocess in its own process group; a
``sitecustomize`` in its ``PYTHONPATH`` refuses and records every non-loopback connection or name lookup, so the
"fully offline" claim is checked, not assumed. Needs the ``label`` extra (``scripts/install_label.sh``).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "monailabel.interfaces.app",
    reason="MONAI Label is not installed: install the label extra with scripts/install_label.sh",
)

import requests  # noqa: E402  (after the skip: installed with the label extra)
from conftest import BUNDLE_CONFIGS, TINY_TRAINING, scratch_folder  # noqa: E402
from PIL import Image  # noqa: E402
from test_bundle_eval_infer import demo_dataset, deployed_bundle  # noqa: E402,F401

from her2_monai.constants import CLASS_NAMES  # noqa: E402
from her2_monai.data.provenance import DEMO_WARNING  # noqa: E402
from her2_monai.label_app import APP_DIR  # noqa: E402
from her2_monai.label_app.config import AppConfig, ConfigError  # noqa: E402
from her2_monai.label_app.datalist import build_train_datalist, parse_image_id  # noqa: E402
from her2_monai.label_app.main import check_bind_host  # noqa: E402
from her2_monai.label_app.tasks import HER2TrainTask, build_train_command  # noqa: E402

READY_TIMEOUT_S = 90.0
PREDICT_KEYS = {"score", "probabilities", "confidence", "refer", "scenario", "detected_stains", "warnings"}
#: ``--conf overrides`` passed through to the inference config. None is needed (the model file records its
#: architecture); this one agrees with the record, so the pass-through is exercised. Compact JSON: the
#: ``monailabel`` launcher re-splits on spaces.
TINY_INFERENCE = {"image_size": TINY_TRAINING["image_size"], "batch_size": 4}
TINY_CONF = json.dumps(TINY_INFERENCE, separators=(",", ":"))

NETGUARD = '''
"""Test-only: refuse and record any network use that is not loopback (loaded by Python at start-up)."""
import os, socket

_LOG = os.environ.get("HER2_NETGUARD_LOG", "")
_LOCAL = ("127.", "::1", "::ffff:127.", "localhost", "0.0.0.0")


def _record(what):
    with open(_LOG, "a") as out:
        out.write(what + "\\n")
    raise OSError("network access is disabled in this test: " + what)


def _is_local(host):
    return host in (None, "", b"") or str(host).startswith(_LOCAL)


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        _record("connect %s" % (address,))
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        _record("connect %s" % (address,))
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        _record("resolve %s" % (host,))
    return _getaddrinfo(host, *args, **kwargs)


if _LOG:
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    with open(_LOG + ".armed", "a") as out:
        out.write("%d\\n" % os.getpid())
'''


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 70-byte PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _monailabel_command() -> list[str]:
    """The documented ``monailabel`` launcher next to this interpreter (or the module it runs)."""
    launcher = Path(sys.executable).with_name("monailabel")
    return [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "monailabel.main"]


def _server_env(workdir: Path) -> dict[str, str]:
    guard = workdir / "netguard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NETGUARD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "MONAILABEL_PYEXE": sys.executable,  # the launcher runs `python` unless told which one
            "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH", "")])),
            "HER2_NETGUARD_LOG": str(workdir / "network.log"),
            "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
            "OMP_NUM_THREADS": "2",
        }
    )
    return env


class LabelServer:
    """``monailabel start_server`` with the HER2 app, as a subprocess in its own process group."""

    def __init__(self, workdir: Path, bundle: Path, studies: Path, host: str | None = "127.0.0.1") -> None:
        self.workdir = workdir
        self.bundle = bundle
        self.studies = studies
        self.app_dir = workdir / "app"
        self.app_dir.mkdir(exist_ok=True)
        # A copy of the shipped main.py: MONAI Label writes logs/, model/, lib/ and bin/ into the app folder.
        shutil.copy2(APP_DIR / "main.py", self.app_dir / "main.py")
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        command = [*_monailabel_command(), "start_server", "--app", str(self.app_dir), "--studies", str(studies)]
        command += ["--conf", "bundle_path", str(bundle), "--conf", "overrides", TINY_CONF, "--port", str(self.port)]
        if host is not None:
            command += ["--host", host]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=workdir, env=_server_env(workdir), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                pytest.fail(f"MONAI Label exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base}/info/", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"MONAI Label not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the whole process group (server and any task subprocess) and wait until it is gone."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


SLIDE_ID = "cmu_small_region"


def _studies(root: Path, demo: Path) -> Path:
    """A datastore with two demo pairs, stains tagged in the ids (``..._he`` / ``..._ihc``), and the real SVS slide of
    ``../shared/data/wsi`` when it is there (for the whole-slide task)."""
    studies = root / "studies"
    studies.mkdir()
    for name in sorted(p.name for p in (demo / "HE" / "test").iterdir())[:2]:
        stem = Path(name).stem
        shutil.copy2(demo / "HE" / "test" / name, studies / f"{stem}_he.png")
        shutil.copy2(demo / "IHC" / "test" / name, studies / f"{stem}_ihc.png")
    slide = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / f"{SLIDE_ID}.svs"
    if slide.is_file():
        shutil.copy2(slide, studies / slide.name)
    return studies


@pytest.fixture(scope="module")
def label_bundle(request, tmp_path_factory, deployed_bundle: Path) -> Iterator[Path]:  # noqa: F811
    """A complete bundle folder (configs + the tiny trained models), as ``--conf bundle_path`` expects."""
    with scratch_folder(request, tmp_path_factory, "label_bundle") as bundle:
        shutil.copytree(BUNDLE_CONFIGS, bundle / "configs")
        shutil.copytree(deployed_bundle / "models", bundle / "models")
        yield bundle


@pytest.fixture(scope="module")
def server(tmp_path_factory, label_bundle: Path, deployed_bundle: Path):  # noqa: F811
    workdir = tmp_path_factory.mktemp("label_server")
    studies = _studies(workdir, demo_dataset(deployed_bundle))
    srv = LabelServer(workdir, label_bundle, studies)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _configs_only(root: Path) -> Path:
    """A bundle folder with the repository's configs and no weights (enough for settings and the host check)."""
    shutil.copytree(BUNDLE_CONFIGS, root / "configs")
    return root


def _secret_paths(srv: LabelServer) -> list[str]:
    return [str(srv.workdir), str(srv.studies), str(srv.bundle), str(srv.app_dir)]


def _assert_clean(srv: LabelServer, text: str) -> None:
    assert "Traceback" not in text, text[:500]
    for secret in _secret_paths(srv):
        assert secret not in text, (secret, text[:500])


def _post(
    srv: LabelServer, model: str, path: Path | None = None, params: dict | None = None, **query
) -> requests.Response:
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")} if path is not None else None
    data = {"params": json.dumps(params or {})}
    return requests.post(f"{srv.base}/infer/{model}", params=query, files=files, data=data, timeout=120)


def _check_prediction(result: dict) -> None:
    assert PREDICT_KEYS <= set(result), result
    assert result["score"] in CLASS_NAMES
    assert isinstance(result["probabilities"], list) and len(result["probabilities"]) == 4
    assert all(isinstance(p, float) for p in result["probabilities"])
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert isinstance(result["confidence"], float) and result["confidence"] == pytest.approx(
        max(result["probabilities"])
    )
    assert isinstance(result["refer"], bool) and result["scenario"] in ("dual", "he_only", "ihc_only")
    assert all(s in ("he", "ihc") for s in result["detected_stains"]) and isinstance(result["warnings"], list)


def _bci_he(shared_data: Path) -> Path:
    return sorted((shared_data / "bci" / "HE" / "test").iterdir())[0]


# ---------------------------------------------------------------------------------------------------------------------
# unit tests: configuration, host guard, training datalist and command (no server)
def test_conf_is_validated(tmp_path: Path) -> None:
    label_bundle = _configs_only(tmp_path / "bundle")
    config = AppConfig.from_conf({"bundle_path": str(label_bundle), "overrides": TINY_CONF, "device": "cpu"})
    assert config.bundle_path == label_bundle.resolve() and config.overrides == TINY_INFERENCE
    assert config.predictor_overrides()["device"] == "$torch.device('cpu')"
    bad = [
        ({"bundle_path": str(tmp_path / "nothing")}, "not a bundle folder"),
        ({"bundle_path": str(label_bundle), "overrides": "{nope"}, "JSON object"),
        ({"bundle_path": str(label_bundle), "overrides": '{"profile": "$__import__(\'os\')"}'}, "expressions"),
        ({"bundle_path": str(label_bundle), "device": "cuda; rm"}, "cpu, cuda or cuda:N"),
        ({"bundle_path": str(label_bundle), "refer_threshold": "2"}, "[0, 1]"),
        ({"bundle_path": str(label_bundle), "bundel_path": "x"}, "unknown --conf key"),
    ]
    for conf, message in bad:
        with pytest.raises(ConfigError) as err:
            AppConfig.from_conf(conf)
        assert message in str(err.value), (conf, err.value)


def test_host_must_be_given_explicitly() -> None:
    check_bind_host(["monailabel", "start_server", "--app", "a", "--host", "127.0.0.1"])
    check_bind_host(["pytest"])  # not a server start: nothing to check
    with pytest.raises(RuntimeError, match="--host 127.0.0.1"):
        check_bind_host(["monailabel", "start_server", "--app", "a", "--studies", "s"])


class FakeDatastore:
    """The datastore calls the datalist builder makes, over a dict ``id -> (file, info, label file or None)``."""

    def __init__(self, root: Path, images: dict[str, tuple[dict, str | None]]) -> None:
        self.items = {}
        for image_id, (info, label) in images.items():
            path = root / f"{image_id}.png"
            path.write_bytes(b"png")
            label_path = None
            if label is not None:
                label_path = root / f"{image_id}.label.json"
                label_path.write_text(label)
            self.items[image_id] = (path, info, label_path)

    def list_images(self) -> list[str]:
        return list(self.items)

    def get_image_uri(self, image_id: str) -> str:
        return str(self.items[image_id][0])

    def get_image_info(self, image_id: str) -> dict:
        return dict(self.items[image_id][1])

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if self.items[image_id][2] is not None and tag == "final" else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return str(self.items[label_id][2])


def test_training_datalist_from_the_datastore(tmp_path: Path) -> None:
    assert parse_image_id("00012_train_2+_he") == ("00012_train_2+", "he")
    assert parse_image_id("IHC_case7") == ("case7", "ihc")
    assert parse_image_id("case7", {"stain": "H&E"}) == ("case7", "he")
    assert parse_image_id("case7") == ("case7", None)
    store = FakeDatastore(
        tmp_path,
        {
            # a BCI pair by name, one of each class (so a stratified validation split is possible), and test pairs
            **{f"{i:05d}_train_{s}_{st}": ({}, None) for i, s in enumerate(CLASS_NAMES * 2) for st in ("he", "ihc")},
            "00100_test_3+_he": ({}, None),
            "00100_test_3+_ihc": ({}, None),
            # the label from a label file beats the image info, which beats the file name
            "00200_train_0_he": ({"label": "2+"}, '{"label": "1+"}'),
            "slideA_patch1_ihc": ({"label": "3+"}, None),
            "he_slideB": ({}, "2+"),
            # skipped: unknown stain, no label, contradicting labels in a pair, a second image of the same stain
            "mystery": ({}, None),
            "slideC_he": ({}, None),
            "00300_train_1+_he": ({}, None),
            "00300_train_1+_ihc": ({"label": "0"}, None),
            "x_ihc": ({"label": 1}, None),
            "ihc_x": ({"label": 1}, None),
        },
    )
    datalist, report = build_train_datalist(store, val_fraction=0.25, seed=0)
    records = {r["id"]: r for split in datalist.values() for r in split}
    assert set(datalist) == {"training", "validation", "test"}
    assert [r["id"] for r in datalist["test"]] == ["00100_test_3+"]
    assert records["00100_test_3+"]["he"].endswith("00100_test_3+_he.png") and records["00100_test_3+"]["label"] == 3
    assert (
        records["00001_train_1+"]["ihc"].endswith("00001_train_1+_ihc.png") and records["00001_train_1+"]["label"] == 1
    )
    assert records["00200_train_0"]["label"] == 1 and records["00200_train_0"]["ihc"] is None
    assert records["slideA_patch1"]["label"] == 3 and records["slideA_patch1"]["he"] is None
    assert records["slideB"]["label"] == 2
    assert len(datalist["validation"]) == 4 and not {r["id"] for r in datalist["validation"]} & {"00100_test_3+"}
    skipped = dict(report.skipped)
    assert set(skipped) == {"mystery", "slideC_he", "00300_train_1+_he", "00300_train_1+_ihc", "x_ihc"}
    assert "stain unknown" in skipped["mystery"] and "no HER2 label" in skipped["slideC_he"]
    assert "disagree" in skipped["00300_train_1+_he"] and "second ihc" in skipped["x_ihc"]
    assert report.counts["test"] == {"0": 0, "1+": 0, "2+": 0, "3+": 1}


def test_train_task_writes_the_datalist_and_runs_the_bundle(tmp_path: Path, monkeypatch) -> None:
    bundle = _configs_only(tmp_path / "bundle")
    config = AppConfig.from_conf({"bundle_path": str(bundle), "overrides": TINY_CONF})
    store = FakeDatastore(tmp_path, {f"{i:05d}_train_{s}_he": ({}, None) for i, s in enumerate(CLASS_NAMES * 2)})
    calls = []

    def fake_run(cmd, cwd=None, check=False):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    task = HER2TrainTask(config)
    result = task({"model": "her2_score", "run_id": "train_classifier", "cls_epochs": 2, "client_id": "x"}, store)
    (cmd,) = calls
    assert cmd[:5] == [sys.executable, "-m", "monai.bundle", "run", "train_classifier"]
    assert cmd[cmd.index("--datalist") + 1] == str(bundle / "eval" / "monailabel_datalist.json")
    assert cmd[cmd.index("--cls_epochs") + 1] == "2" and cmd[cmd.index("--batch_size") + 1] == "4"
    written = json.loads((bundle / "eval" / "monailabel_datalist.json").read_text())
    assert len(written["training"]) + len(written["validation"]) == 8 and written["validation"]
    assert result["returncode"] == 0 and result["counts"]["training"]["0"] >= 1
    for bad in ({"run_id": "rm -rf /"}, {"cls_epochs": "lots"}, {"batch_size": 10**6}, {"val_fraction": 1.5}):
        with pytest.raises(ValueError):
            task({"model": "her2_score", **bad}, store)
    with pytest.raises(ValueError, match="not enough labelled images"):
        task({"model": "her2_score"}, FakeDatastore(tmp_path, {}))
    assert build_train_command(config, "training", Path("d.json"))[4] == "training"


# ---------------------------------------------------------------------------------------------------------------------
# the server
@pytest.mark.slow
def test_server_without_host_refuses_to_listen_everywhere(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    srv = LabelServer(tmp_path, _configs_only(tmp_path / "bundle"), studies, host=None)
    try:
        srv.process.wait(timeout=READY_TIMEOUT_S)
    finally:
        srv.stop()
    assert srv.process.returncode != 0
    assert "add --host 127.0.0.1" in srv.log_tail()
    assert "Uvicorn running" not in srv.log_path.read_text()


@pytest.mark.slow
def test_info_lists_the_tasks(server: LabelServer) -> None:
    response = requests.get(f"{server.base}/info/", timeout=10)
    assert response.status_code == 200
    info = response.json()
    assert set(info["models"]) == {"her2_score", "her2_translate", "her2_wsi"}
    assert info["models"]["her2_score"]["type"] == "classification"
    assert info["models"]["her2_score"]["labels"] == list(CLASS_NAMES)
    assert set(info["trainers"]) == {"her2_score"}
    # The tiny model was trained on the synthetic demo data: the info and every model's description say so.
    assert info["provenance"]["source"] == "demo" and info["warnings"] == [DEMO_WARNING]
    assert all(DEMO_WARNING in model["description"] for model in info["models"].values())
    _assert_clean(server, response.text)


@pytest.mark.slow
def test_score_of_a_real_bci_patch_over_http_equals_the_predict_command(
    server: LabelServer, shared_data: Path, capsys
) -> None:
    from her2_monai.cli import main

    patch = _bci_he(shared_data)
    response = _post(server, "her2_score", patch)
    assert response.status_code == 200, response.text
    result = response.json()
    _check_prediction(result)
    assert result["stain_source"] == "selector" and result["inputs"] == {"image": patch.name}
    _assert_clean(server, response.text)

    flags = [f"--{k}={v}" for k, v in TINY_INFERENCE.items()]
    assert main(["predict", "--image", str(patch), "--bundle", str(server.bundle), *flags]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert set(result) == set(expected)
    for key in expected:
        if key == "inputs":
            continue  # paths on the command line, client-side names over HTTP
        if key == "probabilities":
            assert result[key] == pytest.approx(expected[key], abs=1e-5)
        elif key == "confidence":
            assert result[key] == pytest.approx(expected[key], abs=1e-5)
        else:
            assert result[key] == expected[key], key


@pytest.mark.slow
def test_score_through_the_monai_label_client(server: LabelServer, shared_data: Path, tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.base, tmpdir=str(tmp_path))
    assert "her2_score" in client.info()["models"]
    patch = _bci_he(shared_data)
    image_out, params = client.infer("her2_score", "", {}, file=str(patch))
    result = json.loads(params) if isinstance(params, (bytes, str)) else params  # the client hands JSON back raw
    assert image_out is None
    _check_prediction(result)
    assert result == _post(server, "her2_score", patch).json()

    # a synthetic IHC comes back as a file next to its JSON (MONAI Label's multipart answer)
    image_out, params = client.infer("her2_translate", "", {"size": "input"}, file=str(patch))
    with Image.open(image_out) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.size == Image.open(patch).size == (params["width"], params["height"])


@pytest.mark.slow
def test_pair_by_datastore_id(server: LabelServer) -> None:
    he = sorted(server.studies.glob("*_he.png"))[0]
    ihc_id = he.name.replace("_he.png", "_ihc")
    response = _post(server, "her2_score", he, params={"ihc": ihc_id})
    assert response.status_code == 200, response.text
    result = response.json()
    _check_prediction(result)
    assert result["scenario"] == "dual" and result["stain_source"] == "declared"
    assert result["inputs"] == {"he": he.name, "ihc": ihc_id} and len(result["detected_stains"]) == 2
    # both images from the datastore, by id only
    response = _post(server, "her2_score", None, params={"ihc": ihc_id}, image=he.stem)
    assert response.status_code == 200 and response.json()["scenario"] == "dual"
    assert response.json()["probabilities"] == result["probabilities"]
    # contradictions are client errors
    response = _post(server, "her2_score", he, params={"ihc": ihc_id, "stain": "ihc"})
    assert response.status_code == 400 and "params.stain" in response.json()["detail"]
    response = _post(server, "her2_score", he, params={"ihc": "not_there"})
    assert response.status_code == 404 and "not in the datastore" in response.json()["detail"]


@pytest.mark.slow
def test_synthetic_ihc_is_an_rgb_png(server: LabelServer, shared_data: Path) -> None:
    patch = _bci_he(shared_data)
    model_size = TINY_INFERENCE["image_size"]
    response = _post(server, "her2_translate", patch, params={"source": "he"}, output="image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (model_size, model_size)
        pixels = np.asarray(picture)
    assert pixels.dtype == np.uint8 and pixels.std() > 0
    meta = _post(server, "her2_translate", patch, params={"source": "he"}, output="json").json()
    assert meta["target_stain"] == "ihc" and meta["size"] == "model" and meta["synthetic"] is True
    assert (meta["width"], meta["height"]) == (model_size, model_size)
    response = _post(server, "her2_translate", patch, params={"size": "input"}, output="image")
    with Image.open(io.BytesIO(response.content)) as picture:
        assert picture.size == Image.open(patch).size


@pytest.mark.slow
def test_region_of_a_real_slide_in_the_datastore(server: LabelServer, tmp_path: Path) -> None:
    """A region of the real SVS: tiles, per-tile scores and the region call, the same through the three routes and
    the MONAI Label client, and equal to scoring the same region in-process with the bundle."""
    if not (server.studies / f"{SLIDE_ID}.svs").is_file():
        pytest.skip("the real slide ../shared/data/wsi/cmu_small_region.svs is not available")
    from monailabel.client import MONAILabelClient

    from her2_monai.inference import load_predictor
    from her2_monai.wsi import TilingSettings, run_wsi

    region = {"location": [700, 1000], "size": [900, 800], "tile_size": [256, 256]}
    response = requests.post(
        f"{server.base}/infer/wsi_v2/her2_wsi",
        params={"image": SLIDE_ID},
        data={"wsi": json.dumps(region)},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    _assert_clean(server, response.text)
    assert answer["image"] == SLIDE_ID and answer["region"] == {"location": [700, 1000], "size": [900, 800], "level": 0}
    assert answer["score"] in (*CLASS_NAMES, None) and isinstance(answer["refer"], bool)
    assert answer["provenance"]["source"] == "demo" and answer["warnings"] == [DEMO_WARNING]
    assert answer["tissue_tiles"] == len(answer["tiles"]) > 0
    assert sum(answer["tile_counts"].values()) + answer["referred_tiles"] == answer["tissue_tiles"]
    for tile in answer["tiles"]:
        assert 700 <= tile["x"] and tile["x"] + tile["size"] <= 1600 and 1000 <= tile["y"] <= 1800 - tile["size"]
        assert tile["score"] in CLASS_NAMES and 0.0 <= tile["confidence"] <= 1.0 and isinstance(tile["refer"], bool)
        assert list(tile["probabilities"]) == list(CLASS_NAMES)
    # The same region through the plain infer route (params) and MONAI Label's client (older wsi route).
    flat = {**region, "tile_size": 256}
    again = requests.post(
        f"{server.base}/infer/her2_wsi", params={"image": SLIDE_ID}, data={"params": json.dumps(flat)}, timeout=300
    ).json()
    client = MONAILabelClient(server.base, tmpdir=str(tmp_path))
    _, body = client.wsi_infer("her2_wsi", SLIDE_ID, body=region, output="json")
    via_client = json.loads(body) if isinstance(body, (bytes, str)) else body
    for other in (again, via_client):
        assert [(t["x"], t["y"], t["score"]) for t in other["tiles"]] == [
            (t["x"], t["y"], t["score"]) for t in answer["tiles"]
        ]
        assert other["score"] == answer["score"]
    # QuPath's MONAI Label extension asks for ASAP XML: one polygon per tile, grouped by score.
    xml = requests.post(
        f"{server.base}/infer/wsi_v2/her2_wsi", params={"image": SLIDE_ID, "output": "asap"},
        data={"wsi": json.dumps(region)}, timeout=300,
    )  # fmt: skip
    assert xml.status_code == 200 and xml.headers["content-type"].startswith("application/xml")
    from xml.etree import ElementTree

    polygons = ElementTree.fromstring(xml.text).findall("./Annotations/Annotation")
    assert len(polygons) == answer["tissue_tiles"]
    expected_groups = ["Referred" if t["refer"] else f"HER2 {t['score']}" for t in answer["tiles"]]
    assert [p.get("PartOfGroup") for p in polygons] == expected_groups
    assert len(polygons[0].findall("./Coordinates/Coordinate")) == 4
    # In-process with the same bundle and the same overrides: the same tiles and probabilities.
    predictor = load_predictor(server.bundle, **TINY_INFERENCE)
    local = run_wsi(
        server.studies / f"{SLIDE_ID}.svs", tmp_path / "local", predictor=predictor, progress=False,
        settings=TilingSettings(tile_size=256), region=(700, 1000, 900, 800),
    )  # fmt: skip
    assert local["score"] == answer["score"] and local["tile_counts"] == answer["tile_counts"]
    with open(tmp_path / "local" / "tiles.csv") as stream:
        rows = list(csv.DictReader(stream))
    for row, tile in zip(rows, answer["tiles"], strict=True):
        assert (int(row["x"]), int(row["y"])) == (tile["x"], tile["y"])
        assert float(row["p_3+"]) == pytest.approx(tile["probabilities"]["3+"], abs=1e-5)


@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_a_message(server: LabelServer, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    good = sorted(server.studies.glob("*_he.png"))[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    cases = [
        (("her2_score", text), {}, 415, "not an image"),
        (("her2_score", empty), {}, 400, "empty"),
        (("her2_score", bomb), {}, 413, "pixels"),
        (("her2_translate", bomb), {}, 413, "pixels"),
        (("her2_score", truncated), {}, 400, "truncated"),
        (("no_such_model", good), {}, 404, "unknown model"),
        (("her2_score", None), {}, 400, "no input image"),
        (("her2_score", None), {"image": str(good)}, 404, "not in the datastore"),  # a server path is not an id
        (("her2_score", None), {"image": "../../etc/passwd"}, 404, "not in the datastore"),
        (("her2_wsi", good), {}, 400, "scores a slide of the datastore, not an upload"),
        (("her2_wsi", None), {"image": "no_such_slide"}, 404, "not in the datastore"),
        (("her2_score", good), {"output": "image"}, 400, "JSON only"),
    ]
    for (model, path), query, status, message in cases:
        response = _post(server, model, path, **query)
        assert response.status_code == status, (model, path, query, response.status_code, response.text)
        assert message in response.json()["detail"], (model, response.text)
        _assert_clean(server, response.text)
    response = requests.post(
        f"{server.base}/infer/her2_score",
        files={"file": ("a.png", good.read_bytes())},
        data={"params": "[1"},
        timeout=30,
    )
    assert response.status_code == 400 and "params must be a JSON object" in response.json()["detail"]
    image_id = good.stem
    for route in ("wsi_v2", "wsi"):
        response = requests.post(f"{server.base}/infer/{route}/her2_score", params={"image": image_id}, timeout=30)
        assert response.status_code == 400 and "scores patches" in response.json()["detail"]
        assert requests.post(f"{server.base}/infer/{route}/nope", timeout=30).status_code == 404
    region_cases = [
        ({"location": [0, 0]}, 400, "size must be a list of 2 integers"),
        ({"location": [0, 0], "size": [10**6, 10**6]}, 413, "pixels, more than"),
        ({"location": [500, 0], "size": [64, 64]}, 400, "not inside the slide"),
        ({"tile_size": [64, 32]}, 400, "tile_size must be square"),
        ({"params": {"stain": "xyz"}}, 400, "stain must be one of"),
        ({"params": [1]}, 400, "wsi.params must be a JSON object"),
    ]
    for wsi, status, message in region_cases:
        response = requests.post(
            f"{server.base}/infer/wsi_v2/her2_wsi",
            params={"image": image_id},
            data={"wsi": json.dumps(wsi)},
            timeout=60,
        )
        assert response.status_code == status and message in response.json()["detail"], (wsi, response.text)
        _assert_clean(server, response.text)
    response = requests.post(
        f"{server.base}/infer/wsi_v2/her2_wsi", params={"image": image_id}, data={"wsi": "[1"}, timeout=30
    )
    assert response.status_code == 400 and "wsi must be a JSON object" in response.json()["detail"]
    assert requests.post(f"{server.base}/activelearning/no_such_strategy", timeout=30).status_code == 404
    # size limits apply before the body is read: a claimed terabyte, and a chunked upload with no length at all
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/infer/her2_score")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and "larger than" in json.loads(answer.read())["detail"]
    conn.close()
    chunks = (part for part in (b"--x\r\n", b"garbage"))
    response = requests.post(f"{server.base}/infer/her2_score", data=chunks, timeout=30)
    assert response.status_code == 411 and "Content-Length" in response.json()["detail"]
    assert not list(Path(server.workdir).glob("**/her2-label-*")), "an upload folder was left behind"


@pytest.mark.slow
def test_concurrent_requests_get_their_own_answers(server: LabelServer) -> None:
    patches = sorted(server.studies.glob("*.png"))
    jobs = [("her2_score", p, {}) for p in patches] + [("her2_translate", p, {"output": "image"}) for p in patches]
    jobs = jobs[:8]
    assert len(jobs) == 8

    def answer(job):
        model, path, query = job
        response = _post(server, model, path, **query)
        assert response.status_code == 200, response.text
        return response.json() if model == "her2_score" else np.asarray(Image.open(io.BytesIO(response.content)))

    single = [answer(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(answer, jobs))
    for (model, path, _), alone, parallel in zip(jobs, single, together):
        if model == "her2_score":
            assert parallel == alone, path.name
        else:
            assert np.array_equal(parallel, alone), path.name
    scores = {json.dumps(a["probabilities"]) for a in single if isinstance(a, dict)}
    assert len(scores) > 1, "different patches should not all get the same answer"


@pytest.mark.slow
def test_no_response_shows_a_server_path(server: LabelServer) -> None:
    image_id = sorted(server.studies.glob("*.png"))[0].stem
    for method, path in [
        ("GET", "/info/"),
        ("GET", "/datastore/?output=all"),
        ("GET", f"/datastore/image/info?image={image_id}"),
        ("POST", "/activelearning/random"),
        ("GET", "/logs/?text=true&lines=400"),
    ]:
        response = requests.request(method, f"{server.base}{path}", timeout=30)
        assert response.status_code == 200, (path, response.text[:300])
        for secret in _secret_paths(server):  # the server log itself may hold tracebacks, but no paths
            assert secret not in response.text, (path, secret)


@pytest.mark.slow
def test_fuzz_the_app_endpoints_finds_no_server_error(server: LabelServer) -> None:
    """Schemathesis over the OpenAPI schema the server publishes, restricted to the app's endpoints (see the docs).

    Operations: ``POST /infer/{model}``, ``POST /infer/wsi_v2/{model}`` (the app's routes) and
    ``POST /activelearning/{strategy}`` (MONAI Label's route, the app's strategy lookup); ``model`` free and fixed to
    each of the three tasks; schemathesis's positive and negative generation; 20 cases each, fixed seed: at most
    2 * 4 * 2 * 20 + 2 * 20 = 360 requests. Any answer >= 500 fails.
    """
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is installed with the label extra")
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    per_run = 20
    seen: dict[str, dict[int, int]] = {}
    failures = []
    operations = [r.ok() for r in schema.get_all_operations()]
    targets = []
    for op in operations:
        if op.method.upper() == "POST" and op.path in ("/infer/{model}", "/infer/wsi_v2/{model}"):
            targets += [(op, None)] + [(op, {"model": m}) for m in ("her2_score", "her2_translate", "her2_wsi")]
        elif op.method.upper() == "POST" and op.path == "/activelearning/{strategy}":
            targets.append((op, None))
    assert len(targets) == 9, [f"{op.method} {op.path}" for op in operations]

    def fuzz(op, path_parameters, mode, counts):
        @seed(20261127)
        @settings(
            max_examples=per_run, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(op.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def run(case) -> None:
            response = case.call(base_url=server.base, timeout=60)
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append((f"{op.method} {op.path}", path_parameters, response.status_code, response.text[:200]))
            assert "Traceback" not in response.text

        run()

    for op, path_parameters in targets:
        for mode in GenerationMode:
            key = f"{op.method.upper()} {op.path} {path_parameters or ''} {mode.value}"
            fuzz(op, path_parameters, mode, seen.setdefault(key, {}))
    total = sum(sum(c.values()) for c in seen.values())
    print(f"schemathesis: {total} requests over {len(seen)} operation/mode runs: {json.dumps(seen, indent=1)}")
    assert 50 <= total <= 2 * 4 * 2 * per_run + 2 * per_run
    assert not failures, failures


@pytest.mark.slow
def test_server_stays_offline_and_shuts_down_cleanly(server: LabelServer) -> None:
    armed = Path(str(server.workdir / "network.log") + ".armed")
    assert armed.is_file(), "the network guard was not loaded into the server"
    network_log = server.workdir / "network.log"
    assert not network_log.exists(), network_log.read_text()
    server.stop()
    assert server.process.returncode is not None
    deadline = time.monotonic() + 10
    while server.group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.group_alive(), "processes of the server's group are still running"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.base}/info/", timeout=2)
