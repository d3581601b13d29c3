"""Whole-slide inference throughput (tiles/s) and peak memory, on the real SVS and on a 20k x 20k synthetic slide.

The synthetic slide is a pyramidal, tiled, JPEG-compressed TIFF (levels 1, 1/4, 1/16, like a scanner's) written tile
by tile with ``tifffile`` from a generator, so it is never held in memory: an ellipse of tissue made of real BCI and
MIST H&E patches (``../shared/data``) on glass. Each measurement runs in its own process so that its peak resident
memory (``ru_maxrss``) is its own:

* ``read``: the tissue tiles planned and read (tile decoding only) -- the baseline;
* ``wsi``: the full ``run_wsi`` (tissue mask, tiles streamed in batches through the bundle's predictor, outputs).

Printed: tiles, seconds, tiles/s, the ratio of full to read-only throughput, peak RSS, the RSS of the same process
before the slide was opened (imports and model), and the size a full-resolution RGB array of the slide would take.

Usage::

    python benchmarks/bench_wsi.py --bundle /tmp/wsi_bundle            # needs models/model.pt (demo training)
    python benchmarks/bench_wsi.py --bundle bundle --size 20000 --tile-size 512
    python benchmarks/bench_wsi.py --bundle bundle --no-synthetic --repeat 5   # the SVS, median of 5 runs
    python benchmarks/bench_wsi.py --bundle bundle --no-synthetic --batch-size auto 16 4 --repeat 2  # batch sizes

Before/after comparisons: ``bash benchmarks/wsi_before_after.sh <commit> <bundle>`` runs this script's ``--measure
wsi`` from each tree in turn, alternating, so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"


def _patches(side: int) -> list[np.ndarray]:
    from her2_monai.data.image_reader import read_rgb

    files = sorted((DATA / "bci" / "HE" / "test").glob("*.png")) + sorted((DATA / "mist" / "HE").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no real H&E patches under {DATA}")
    return [np.asarray(Image.fromarray(read_rgb(f)).resize((side, side), Image.Resampling.BILINEAR)) for f in files]


def write_synthetic_slide(path: Path, size: int = 20000, tile: int = 512, levels: tuple[int, ...] = (1, 4, 16)) -> Path:
    """Write a ``size`` x ``size`` pyramidal tiled TIFF, streaming tiles (peak memory: a few tiles)."""
    import tifffile

    glass = np.array([242, 240, 244], np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for downsample in levels:
            side = -(-size // downsample)
            patch_side = max(1, 512 // downsample)
            patches = _patches(patch_side)
            across = -(-side // tile)

            def tiles(side=side, patch_side=patch_side, patches=patches, across=across, downsample=downsample):
                for ty in range(across):
                    for tx in range(across):
                        out = np.empty((tile, tile, 3), np.uint8)
                        out[:] = glass
                        for py in range(0, tile, patch_side):
                            for px in range(0, tile, patch_side):
                                gy, gx = ty * tile + py, tx * tile + px  # level pixels
                                cy, cx = (gy + patch_side / 2) / side - 0.5, (gx + patch_side / 2) / side - 0.5
                                if (cy / 0.42) ** 2 + (cx / 0.36) ** 2 <= 1.0:
                                    k = (gy * downsample // 512 * 7919 + gx * downsample // 512 * 104729) % len(patches)
                                    patch = patches[k][: tile - py, : tile - px]
                                    out[py : py + patch_side, px : px + patch_side] = patch
                        yield out

            writer.write(
                tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                photometric="rgb", subfiletype=0 if downsample == 1 else 1,
            )  # fmt: skip
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(mode: str, slide: str, bundle: str, tile_size: int, batch_size: int | None, threads: int) -> dict:
    """One measurement in this process (called in a child process by :func:`main`)."""
    import torch

    torch.set_num_threads(threads)
    from her2_monai.wsi import TilingSettings, open_slide, plan_tiles, run_wsi

    settings = TilingSettings(tile_size=tile_size, batch_size=batch_size)
    predictor = None
    if mode == "wsi":
        from her2_monai.inference import load_predictor

        predictor = load_predictor(bundle, CONFIG)  # the scorer gives each batch its size
    before = _rss_mb()
    start = time.perf_counter()
    if mode == "read":
        with open_slide(slide) as opened:
            plan = plan_tiles(opened, settings)
            for tile in plan.tiles:
                opened.read_region(tile.x, tile.y, tile.read_size, tile.read_size, tile.level)
        tiles = len(plan.tiles)
    else:
        with tempfile.TemporaryDirectory() as out:
            summary = run_wsi(slide, out, predictor=predictor, settings=settings, progress=False)
        tiles = summary["tissue_tiles"]
    seconds = time.perf_counter() - start
    return {"mode": mode, "tiles": tiles, "seconds": seconds, "rss_before_mb": before, "peak_rss_mb": _rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundle", help="bundle folder with models/model.pt")
    parser.add_argument("--size", type=int, default=20000, help="side of the synthetic slide")
    parser.add_argument("--tile-size", type=int, default=512, help="tile side on the synthetic slide (level 0)")
    parser.add_argument("--svs-tile-size", type=int, default=256, help="tile side on the real SVS (2220 x 2967)")
    parser.add_argument(
        "--batch-size",
        nargs="+",
        default=["auto"],
        help="tiles per forward pass: auto (wsi's default) or a number; several are run in turn and compared with "
        "the first",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (own process each): median")
    parser.add_argument("--no-synthetic", action="store_true", help="the real SVS only")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "SLIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from her2_monai.wsi.cli import parse_batch_size

    if args.measure:
        mode, slide = args.measure
        batch_size = parse_batch_size(args.batch_size[0])
        print(json.dumps(measure(mode, slide, args.bundle, args.tile_size, batch_size, args.threads)))
        return
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {args.repeat}")
    for size in args.batch_size:
        try:
            parse_batch_size(size)
        except ValueError as error:
            raise SystemExit(str(error).replace("--batch_size", "--batch-size")) from None
    modes = ["read", *(f"wsi {size}" for size in args.batch_size)]
    with tempfile.TemporaryDirectory() as folder:
        synthetic = Path(folder) / "synthetic.tif"
        if not args.no_synthetic:
            start = time.perf_counter()
            write_synthetic_slide(synthetic, args.size)
            written = time.perf_counter() - start
            megabytes = synthetic.stat().st_size / 2**20
            print(f"synthetic {args.size} x {args.size} slide written in {written:.0f} s ({megabytes:.0f} MB on disk); "
                  f"writer peak RSS {_rss_mb():.0f} MB")  # fmt: skip
        runs = [("real SVS 2220 x 2967", str(DATA / "wsi" / "cmu_small_region.svs"), args.svs_tile_size)]
        if not args.no_synthetic:
            runs.append((f"synthetic {args.size} x {args.size}", str(synthetic), args.tile_size))
        for name, slide, tile_size in runs:
            full_mb = 0.0
            results = {}
            runs_seconds: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.repeat):
                for mode in modes:  # in turn, so that the machine's load falls on every setting alike
                    kind, _, size = mode.partition(" ")
                    command = [sys.executable, __file__, "--measure", kind, slide, "--bundle", args.bundle]
                    command += ["--tile-size", str(tile_size), "--batch-size", size or "auto"]
                    command += ["--threads", str(args.threads)]
                    done = subprocess.run(command, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise SystemExit(f"{mode} on {name} failed:\n{done.stderr[-3000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    runs_seconds[mode].append(result["seconds"])
                    results[mode] = {**result, "seconds": statistics.median(runs_seconds[mode])}
            from her2_monai.wsi import open_slide

            with open_slide(slide) as opened:
                width, height = opened.dimensions
                full_mb = width * height * 3 / 2**20
            read = results["read"]
            read_rate = read["tiles"] / read["seconds"]
            print(f"\n{name}, tiles of {tile_size} px (full-resolution RGB array would be {full_mb:.0f} MB):")
            if args.repeat > 1:
                print("  seconds of each run (median below): " + "; ".join(
                    f"{mode} " + ", ".join(f"{s:.2f}" for s in values) for mode, values in runs_seconds.items()
                ))  # fmt: skip
            print(f"  read only : {read['tiles']} tiles in {read['seconds']:.1f} s = {read_rate:.2f} tiles/s; "
                  f"peak RSS {read['peak_rss_mb']:.0f} MB")  # fmt: skip
            first_rate = None
            for mode in modes[1:]:
                wsi = results[mode]
                wsi_rate = wsi["tiles"] / wsi["seconds"]
                first_rate = first_rate or wsi_rate
                versus = f", {wsi_rate / first_rate:.2f}x batch {modes[1][4:]}" if len(modes) > 2 else ""
                print(f"  full run, batch {mode[4:]}: {wsi['tiles']} tiles in {wsi['seconds']:.1f} s = "
                      f"{wsi_rate:.2f} tiles/s ({wsi_rate / read_rate:.2f}x the read-only rate{versus}); peak RSS "
                      f"{wsi['peak_rss_mb']:.0f} MB (after loading the model: {wsi['rss_before_mb']:.0f} MB; "
                      f"peak / full-resolution array = {wsi['peak_rss_mb'] / full_mb:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
