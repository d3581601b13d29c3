"""Cohort scoring throughput: ``wsi --slides`` on one process (the baseline) against torchrun with N processes.

The cohort: the real SVS (``../shared/data/wsi/cmu_small_region.svs``) and ``--mosaics`` pyramidal tiled JPEG TIFFs
of real BCI and MIST H&E patches, of several sizes (written with ``bench_wsi.write_synthetic_slide``), listed in a
cohort CSV (absolute paths). Each run is a fresh command in its own process(es), timed from outside (model loading,
hashing and the table included), so the figures are what a user waits for:

* ``1 process x 1 thread`` (the baseline): ``python -m her2_monai wsi --slides cohort.csv ...``;
* ``1 process x N threads``: the same with N intra-op threads (the cores used another way);
* ``N processes x 1 thread``: ``python -m torch.distributed.run --standalone --nproc_per_node N -m her2_monai wsi``;
* ``resume``: the baseline command again on its finished output (every slide skipped: the fixed cost).

Printed: slides, scored tiles, wall seconds, slides/hour, tiles/s, the ratio to the baseline, and whether the
tables agree slide by slide (status, call and tile counts; ``--precision fp32`` pins float32, otherwise the bundle's
choice, bf16 autocast on a CPU with bf16 hardware, whose rounding changes with the thread count).

Usage::

    python benchmarks/bench_cohort.py --bundle /work/main/bundle     # a trained bundle (read only)
    python benchmarks/bench_cohort.py --bundle bundle --mosaics 8 --tile-size 256 --nproc 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wsi import CONFIG, DATA, write_synthetic_slide  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_cohort(folder: Path, mosaics: int, largest: int) -> Path:
    """The mosaics (sides ``largest`` down to half of it) and the real SVS, listed in ``folder/cohort.csv``."""
    sides = [largest - (largest // 2 * k) // max(1, mosaics - 1) for k in range(mosaics)]
    rows = [("cmu_small_region", str(DATA / "wsi" / "cmu_small_region.svs"))]
    for k, side in enumerate(sides):
        path = write_synthetic_slide(folder / f"mosaic_{k:02d}_{side}.tif", side, tile=256, levels=(1, 4))
        rows.append((path.stem, str(path)))
    table = folder / "cohort.csv"
    with open(table, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["slide_id", "slide"])
        writer.writerows(rows)
    return table


def run(command: list[str], threads: int, precision: str | None) -> float:
    """Run a command with ``threads`` intra-op threads; its wall time (it must end with status 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    if precision:
        env["HER2_CPU_PRECISION"] = precision
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def results(output: Path) -> dict[str, tuple]:
    """Per slide: status, call and tile counts."""
    with open(output / "cohort.csv") as stream:
        return {
            r["slide_id"]: (r["status"], r["call"], r["tissue_tiles"], r["referred_tiles"])
            + tuple(r[k] for k in r if k.startswith("tiles_") and k != "tiles_per_second")
            for r in csv.DictReader(stream)
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundle", help="bundle folder with models/model.pt (only read)")
    parser.add_argument("--mosaics", type=int, default=8, help="mosaic slides besides the real SVS")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--batch-size", default="auto", help="tiles per forward pass (default: auto, as wsi)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--largest", type=int, default=3072, help="side of the largest mosaic (level 0 px)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="pin the CPU arithmetic (default: the bundle's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        start = time.perf_counter()
        table = write_cohort(folder, args.mosaics, args.largest)
        print(f"cohort of {args.mosaics + 1} slides written in {time.perf_counter() - start:.0f} s")
        options = ["--slides", str(table), "--bundle", args.bundle, "--config_file", str(CONFIG)]
        options += ["--tile_size", str(args.tile_size), "--batch_size", str(args.batch_size), "--progress", "false"]
        single = [sys.executable, "-m", "her2_monai", "wsi", *options]
        multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        multi += ["-m", "her2_monai", "wsi", *options]
        n = args.nproc
        runs = [
            ("1 process x 1 thread", [*single, "--output", str(folder / "one")], 1, folder / "one"),
            (f"1 process x {n} threads", [*single, "--output", str(folder / "threads")], n, folder / "threads"),
            (f"{n} processes x 1 thread", [*multi, "--output", str(folder / "ranks")], 1, folder / "ranks"),
            ("resume (all done)", [*single, "--output", str(folder / "one")], 1, folder / "one"),
        ]
        baseline = None
        for name, command, threads, output in runs:
            seconds = run(command, threads, args.precision)
            record = json.loads((output / "cohort.json").read_text())["run"]
            tiles = sum(
                r["tissue_tiles"] - r["refused_tiles"]
                for r in json.loads((output / "cohort.json").read_text())["slides"]
                if r["status"] == "scored"
            )
            if name.startswith("resume"):
                print(f"{name:24s}: {record['skipped_done_earlier']} slides skipped in {seconds:.1f} s")
                continue
            baseline = baseline or seconds
            print(
                f"{name:24s}: {record['slides']} slides ({record['scored']} scored), {tiles} tiles in {seconds:.1f} s "
                f"wall = {3600 * record['slides'] / seconds:.0f} slides/hour, {tiles / seconds:.2f} tiles/s "
                f"({baseline / seconds:.2f}x the baseline)"
            )
        reference = results(folder / "one")
        for other in ("threads", "ranks"):
            differ = [k for k, v in results(folder / other).items() if reference.get(k) != v]
            print(f"{other} table against the baseline's (status, call, tile counts): {len(differ)} slides differ "
                  f"{differ if differ else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
