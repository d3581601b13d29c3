"""Before/after grid of stain normalisation on real H&E patches, plus the statistics each method moved.

Rows: 3 BCI and 3 MIST H&E patches. Columns: the input, then the input normalised to the tiatoolbox H&E target by
each method (Macenko, Reinhard, histogram matching, multi-target Macenko fitted on the target plus the 4 MIST H&E).
The target itself is drawn in the top-left corner of the header row.

Run: ``python benchmarks/stain_norm_grid.py [--output /tmp/stain_norm_grid.png] [--size 256]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from her2_monai.data.image_reader import read_rgb
from her2_monai.transforms.stain_normalization import (
    METHODS,
    NormalizeStain,
    StainReference,
    channel_histograms,
    macenko_stain_matrix,
    reinhard_statistics,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET = DATA / "stain_reference" / "he_target_tiatoolbox.png"


def load(path: Path, size: int) -> np.ndarray:
    """``(3, size, size)`` float32 in [0, 255]."""
    image = Image.fromarray(read_rgb(path)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()


def hwc(image: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)


def label(tile: np.ndarray, text: str) -> np.ndarray:
    canvas = Image.fromarray(tile.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, 8 + 6 * len(text), 14], fill=(255, 255, 255))
    draw.text((4, 2), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def measures(image: np.ndarray, references: dict[str, StainReference], vectors_from: str) -> dict[str, float]:
    """Distances of an image's statistics to the references: LAB mean/std (Reinhard), stain-vector angle in degrees
    to the ``vectors_from`` reference (Macenko or multi-target), and the L1 distance of the channel CDFs summed over
    the 256 levels, averaged over channels (histogram). LAB and CDF distances are to the tiatoolbox target."""
    image = hwc(image)
    mean, std = reinhard_statistics(image)
    reinhard = references["reinhard"].statistics
    vectors = macenko_stain_matrix(image)[0]
    target = np.asarray(references[vectors_from].statistics["stain_vectors"])
    reference_hist = np.asarray(references["histogram"].statistics["histograms"], dtype=np.float64)
    cdf = np.cumsum(channel_histograms(image), axis=1) / (image.shape[0] * image.shape[1])
    ref_cdf = np.cumsum(reference_hist, axis=1) / reference_hist.sum(axis=1, keepdims=True)
    return {
        "lab_mean": float(np.linalg.norm(mean - np.asarray(reinhard["lab_mean"]))),
        "lab_std": float(np.linalg.norm(std - np.asarray(reinhard["lab_std"]))),
        "angle": float(np.degrees(np.arccos(np.clip((vectors * target).sum(axis=1), -1, 1))).mean()),
        "cdf": float(np.abs(cdf - ref_cdf).sum(axis=1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="/tmp/stain_norm_grid.png")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    bci = sorted((DATA / "bci" / "HE" / "test").glob("*.png"))
    mist = sorted((DATA / "mist" / "HE").glob("*.jpg"))
    rows = [*bci[:3], *mist[:3]]
    target = load(TARGET, 512)
    references = {m: StainReference.fit([target], method=m, stain="he") for m in ("macenko", "reinhard", "histogram")}
    references["multitarget"] = StainReference.fit([target, *[load(p, 512) for p in mist]], "multitarget", "he")
    normalizers = {m: NormalizeStain(references[m]) for m in METHODS}
    size = args.size
    header = [label(np.moveaxis(load(TARGET, size), 0, -1), "target")]
    header += [np.full((size, size, 3), 255, np.uint8) for _ in METHODS]
    grid_rows = [np.concatenate(header, axis=1)]
    totals = {m: {k: [0.0, 0.0] for k in ("lab_mean", "lab_std", "angle", "cdf")} for m in METHODS}
    print("| image | method | LAB mean dist | LAB std dist | stain angle deg | CDF L1 |")
    print("|---|---|---|---|---|---|")
    for path in rows:
        image = load(path, size)
        tiles = [label(hwc(image), path.name[:16])]
        for method, normalize in normalizers.items():
            out = normalize(image)
            tiles.append(label(hwc(out), method))
            vectors_from = "multitarget" if method == "multitarget" else "macenko"
            before, after = measures(image, references, vectors_from), measures(out, references, vectors_from)
            for key in before:
                totals[method][key][0] += before[key] / len(rows)
                totals[method][key][1] += after[key] / len(rows)
            print(
                f"| {path.name} | {method} | {before['lab_mean']:.1f} -> {after['lab_mean']:.1f} | "
                f"{before['lab_std']:.1f} -> {after['lab_std']:.1f} | {before['angle']:.1f} -> {after['angle']:.1f} | "
                f"{before['cdf']:.3f} -> {after['cdf']:.3f} |"
            )
        grid_rows.append(np.concatenate(tiles, axis=1))
    print("\nmean over the images (before -> after):")
    for method, values in totals.items():
        print(f"{method:12s} " + "  ".join(f"{k} {b:.2f}->{a:.2f}" for k, (b, a) in values.items()))
    Image.fromarray(np.concatenate(grid_rows, axis=0)).save(args.output)
    print(f"grid written to {args.output} (columns: input, {', '.join(METHODS)})")


if __name__ == "__main__":
    main()
