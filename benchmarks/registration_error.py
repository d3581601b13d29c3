"""Registration error on the real BCI / MIST pairs displaced by a known rigid transform.

For each pair (downscaled to ``--size`` px) the IHC is displaced by a known rotation and shift and registered back to
the H&E. Consecutive sections are never perfectly aligned, so two errors are reported (pixels at ``--size``):

- ``consistency``: mean distance, over a grid of points, between the registration of the displaced pair composed with
  the known displacement and the registration of the undisplaced pair (the recovery of the known displacement);
- ``vs identity``: the same against the identity (assumes the dataset's pair was perfectly aligned to begin with).

Run: ``python benchmarks/registration_error.py [--size 256] [--angle 8] [--shift 12 -15] [--channel tissue]``
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from her2_monai.data.image_reader import read_rgb
from her2_monai.registration import PairRegistration, RegistrationWarning, euler_matrix, warp_rgb
from her2_monai.registration.pairwise import RegistrationResult

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pairs() -> list[tuple[Path, Path]]:
    """The real H&E / IHC pairs: BCI test samples then MIST samples."""
    he = sorted((DATA / "bci" / "HE" / "test").glob("*.png")) + sorted((DATA / "mist" / "HE").glob("*.jpg"))
    return [(p, Path(str(p).replace("/HE/", "/IHC/"))) for p in he]


def load(path: Path, size: int) -> np.ndarray:
    """An ``(size, size, 3)`` uint8 RGB image."""
    return np.asarray(Image.fromarray(read_rgb(path)).resize((size, size), Image.BILINEAR))


def displace(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``out(x) = image(matrix @ x)`` with white fill (the same resampling the registration applies)."""
    h, w = image.shape[:2]
    result = RegistrationResult("rigid", matrix, matrix, 1.0, (h, w), (h, w), (h, w))
    return warp_rgb(image, result)


def errors(size: int, known: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> tuple[float, float, float]:
    """(consistency px, vs-identity px, angle error deg) over a grid inside the image."""
    grid = np.stack(np.meshgrid(np.arange(size // 8, size - size // 8, 8), np.arange(size // 8, size - size // 8, 8)))
    points = np.concatenate([grid.reshape(2, -1), np.ones((1, grid[0].size))])
    recovered = known @ s1
    consistency = np.linalg.norm((recovered @ points - s0 @ points)[:2], axis=0).mean()
    identity = np.linalg.norm((recovered @ points - points)[:2], axis=0).mean()
    angle = abs(math.degrees(math.atan2(recovered[1, 0], recovered[0, 0]) - math.atan2(s0[1, 0], s0[0, 0])))
    return float(consistency), float(identity), float(angle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--angle", type=float, default=8.0)
    parser.add_argument("--shift", type=float, nargs=2, default=(12.0, -15.0))
    parser.add_argument("--channel", default="tissue")
    parser.add_argument("--transform", default="rigid")
    args = parser.parse_args()
    registration = PairRegistration(transform=args.transform, channel=args.channel, max_side=args.size)
    center = ((args.size - 1) / 2, (args.size - 1) / 2)
    known = euler_matrix(args.angle, tuple(args.shift), center)
    print("| pair | consistency px | vs identity px | angle err deg | NMI before -> after | s |")
    print("|---|---|---|---|---|---|")
    for he_path, ihc_path in pairs():
        he, ihc = load(he_path, args.size), load(ihc_path, args.size)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            r0 = registration(he, ihc)
            r1 = registration(he, displace(ihc, known))
        seconds = (time.perf_counter() - start) / 2
        c, i, a = errors(args.size, known, r0.matrix, r1.matrix)
        q = r1.quality
        name = (
            f"{he_path.parent.parent.name}/{he_path.name}" if he_path.parent.name == "test" else f"mist/{he_path.name}"
        )
        print(
            f"| {name} | {c:.2f} | {i:.2f} | {a:.2f} | {q['nmi_before']:.4f} -> {q['nmi_after']:.4f} | {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
