"""Latency of the MONAI Label app per request, measured against a real ``monailabel start_server`` on loopback.

Starts the server with the HER2 app (``her2_monai/label_app``), sends each request kind ``--requests`` times one
after the other and prints p50 / p95 / mean / max in milliseconds. One row sends ``--concurrency`` requests at once,
repeated, and reports the latency each client saw (requests queue on the model lock: this shows the queueing, not a
speed-up). The baseline is the same H&E patch through the predictor in this process (no HTTP, no upload checks; in a
worker thread like the server's handlers); the last column is each p50 over the baseline's.

Without ``--bundle`` a tiny bundle (the test suite's toy architecture, 32 px) is trained first into a temporary
folder (about a minute on 2 CPU cores), so the numbers are the server's overhead plus a tiny model; give a trained
bundle folder (``configs/`` + ``models/``) and its ``--overrides`` to measure a real one.

Usage::

    python benchmarks/bench_label_server.py                              # tiny bundle, 50 requests per kind
    python benchmarks/bench_label_server.py --bundle bundle --requests 20 --image patch.png
    python benchmarks/bench_label_server.py --bundle /path/b --overrides '{"profile":"bci"}'

Needs the ``label`` extra (``scripts/install_label.sh``). Timings on a shared CPU are noisy: the load average before
and after is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_BCI = REPO.parent / "shared" / "data" / "bci"
#: The test suite's toy training run (tests/conftest.py TINY_TRAINING) and the inference overrides it needs.
TINY_TRAINING = {
    "demo_n_per_class": 4, "demo_image_size": 32, "image_size": 32, "gan_epochs": 1, "gan_batch_size": 4,
    "gan_ngf": 8, "gan_n_blocks": 1, "gan_ndf": 8, "cls_epochs": 1, "batch_size": 4, "shared_backbone": "resnet18",
    "specific_backbone": "resnet18", "selector_steps": 3,
}  # fmt: skip
#: No architecture override is needed (model.pt records it); the batch size is passed to show the mechanism.
TINY_INFERENCE = {"batch_size": 4}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_tiny_bundle(root: Path) -> Path:
    """Train the toy bundle into ``root`` (configs copied from the repository) and return it."""
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(root / "configs/train.json")]
    cmd += ["--bundle_root", str(root), "--demo_cache_dir", str(root / "cache"), "--tracker", "none"]
    for key, value in TINY_TRAINING.items():
        cmd += [f"--{key}", str(value)]
    print(f"training the tiny bundle into {root} ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=root)
    return root


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def row(name: str, times_s: list[float]) -> tuple[str, int, float, float, float, float]:
    ms = [t * 1000.0 for t in times_s]
    return name, len(ms), percentile(ms, 50), percentile(ms, 95), statistics.fmean(ms), max(ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="trained bundle folder (configs/ + models/); default: train a toy")
    parser.add_argument("--overrides", default=None, help="--conf overrides JSON (default: the toy architecture)")
    parser.add_argument("--image", type=Path, help="H&E patch to send (default: a real BCI patch, else a demo one)")
    parser.add_argument("--requests", type=int, default=50, help="requests per kind")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the concurrent row")
    args = parser.parse_args()

    import requests

    workdir = Path(tempfile.mkdtemp(prefix="her2-bench-label-"))
    server = None
    try:
        bundle = args.bundle.resolve() if args.bundle else train_tiny_bundle(workdir / "bundle")
        overrides = args.overrides if args.overrides is not None else json.dumps(TINY_INFERENCE)
        overrides = json.dumps(json.loads(overrides), separators=(",", ":"))  # the launcher re-splits on spaces
        image = args.image
        if image is None:
            bci = sorted((SHARED_BCI / "HE" / "test").glob("*.png")) if SHARED_BCI.is_dir() else []
            demo = sorted((workdir / "bundle" / "cache").glob("*/HE/test/*.png"))
            image = (bci or demo or [None])[0]
        if image is None:
            raise SystemExit("no H&E patch found: pass --image FILE")
        studies = workdir / "studies"
        studies.mkdir()
        shutil.copy2(image, studies / f"bench{image.suffix}")
        app_dir = workdir / "app"
        app_dir.mkdir()
        shutil.copy2(REPO / "her2_monai" / "label_app" / "main.py", app_dir / "main.py")
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        launcher = Path(sys.executable).with_name("monailabel")
        cmd = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "monailabel.main"]
        cmd += ["start_server", "--app", str(app_dir), "--studies", str(studies), "--conf", "bundle_path", str(bundle)]
        cmd += ["--conf", "overrides", overrides, "--host", "127.0.0.1", "--port", str(port)]
        env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "MONAI_LABEL_SESSION_PATH": str(workdir / "s")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        log = (workdir / "server.log").open("w")
        t0 = time.monotonic()
        server = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            if server.poll() is not None or time.monotonic() - t0 > 120:
                raise SystemExit(f"server did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/info/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        startup = time.monotonic() - t0
        payload = image.read_bytes()

        def upload(model: str, **query) -> float:
            start = time.perf_counter()
            response = requests.post(
                f"{base}/infer/{model}", params=query, files={"file": (image.name, payload)}, timeout=300
            )
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                raise SystemExit(f"{model}: {response.status_code} {response.text[:300]}")
            return elapsed

        def by_id() -> float:
            start = time.perf_counter()
            response = requests.post(f"{base}/infer/her2_score", params={"image": "bench"}, timeout=300)
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                raise SystemExit(f"by id: {response.status_code} {response.text[:300]}")
            return elapsed

        kinds = {
            "her2_score, upload": lambda: upload("her2_score"),
            "her2_score, datastore id": by_id,
            "her2_translate, upload -> PNG": lambda: upload("her2_translate", output="image"),
        }
        load_before = os.getloadavg()
        rows = []
        for name, call in kinds.items():
            for _ in range(3):
                call()  # warm-up
            rows.append(row(name, [call() for _ in range(args.requests)]))
        rounds = max(1, args.requests // args.concurrency)
        concurrent: list[float] = []
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for _ in range(rounds):
                concurrent += list(pool.map(lambda _: upload("her2_score"), range(args.concurrency)))
        rows.append(row(f"her2_score, {args.concurrency} clients at once", concurrent))

        from her2_monai.inference import load_predictor

        predictor = load_predictor(bundle, **json.loads(overrides))

        def in_process() -> float:
            start = time.perf_counter()
            predictor.predict(image=str(image))
            return time.perf_counter() - start

        # In a worker thread, like the server's request handlers (PyTorch's CPU threading differs on the main thread).
        with ThreadPoolExecutor(max_workers=1) as pool:
            for _ in range(3):
                pool.submit(in_process).result()
            baseline = [pool.submit(in_process).result() for _ in range(args.requests)]
        rows.append(row("in-process predictor.predict (baseline)", baseline))
        load_after = os.getloadavg()
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)

    base_p50 = rows[-1][2]
    print(f"\nimage: {image.name} ({describe(image)}), bundle: {'tiny (trained here)' if not args.bundle else bundle}")
    print(f"server start-up to the first /info/ answer: {startup:.1f} s")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print(f"{'request':44s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s} {'mean ms':>9s} {'max ms':>9s} {'p50/base':>9s}")
    for name, n, p50, p95, mean, worst in rows:
        print(f"{name:44s} {n:4d} {p50:9.1f} {p95:9.1f} {mean:9.1f} {worst:9.1f} {p50 / base_p50:9.2f}")


def describe(path: Path) -> str:
    """``"WxH FORMAT"`` of an image file."""
    from PIL import Image

    with Image.open(path) as image:
        return f"{image.width}x{image.height} {image.format}"


if __name__ == "__main__":
    main()
