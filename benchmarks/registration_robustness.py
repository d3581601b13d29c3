"""Registration robustness and verdict on the sealed split: real pairs displaced by known random affine transforms.

Every real H&E / IHC pair of one part of ``benchmarks/sealed_split.py`` (tune: BCI; report: MIST) is resized to each
``--sizes`` side, and its IHC is displaced ``--per_pair`` times (fixed seed) by a random affine transform about the
centre: rotation up to ``--max_angle`` degrees, translation up to ``--max_shift`` of the side, scale 0.95-1.05, shear
up to 0.03, with a white or black fill (alternating). The displaced IHC is registered back to the H&E. A control
follows (``--unrelated``, on by default): each H&E against the next pair's IHC (another case, displaced once), where
nothing can be aligned, so every verdict other than ``uncertain`` / ``failed`` is a miss.

Two errors, each the mean distance (px at that size) over a 5x5 grid spanning the central 60% of the image:

- ``error``: ``T`` (the registration of the displaced pair) against ``D^-1`` (``D`` the known displacement), as in
  issue 24. Consecutive sections are not perfectly aligned to begin with, so this includes the pair's own
  misalignment (and any bias of the method on that pair);
- ``consistency``: ``T`` against ``D^-1 R0``, ``R0`` the same method's registration of the undisplaced pair (``ref
  offset``: its distance from the identity): does the displacement change the answer? It does not say the answer is
  right.

With ``--transform affine`` (the default here) the similarity stage is recorded too (``error_similarity``,
``consistency_similarity``; ``--rescore FILE --stage similarity`` scores it: the default transform). The verdict
(``registered`` / ``uncertain`` / ``failed``) is scored against both: large errors (> 20 px) it catches (marked
uncertain or failed) and good registrations (< 5 px) it wrongly flags; ``--candidates`` compares every recorded
verdict measure at several thresholds (how the rule is chosen on tune).

Run (choose on tune, score report once)::

    python benchmarks/registration_robustness.py --part tune [--sizes 1024 512] [--per_pair 3] --json tune.json
    python benchmarks/registration_robustness.py --rescore tune.json --stage similarity --candidates
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sealed_split import real_pairs  # noqa: E402

from her2_monai.registration import PairRegistration, RegistrationResult, RegistrationWarning, warp_rgb  # noqa: E402
from her2_monai.registration.pairwise import _verdict  # noqa: E402


def random_displacement(rng: np.random.Generator, size: int, max_angle: float, max_shift: float) -> np.ndarray:
    """A random ``(3, 3)`` affine displacement about the image centre: ``displaced(x) = ihc(D x)``.

    Args:
        rng: random generator.
        size: image side in pixels.
        max_angle: largest rotation in degrees.
        max_shift: largest translation as a fraction of the side.

    Returns:
        The matrix ``D``.
    """
    angle = math.radians(rng.uniform(-max_angle, max_angle))
    scale = rng.uniform(0.95, 1.05)
    shear = rng.uniform(-0.03, 0.03)
    shift = rng.uniform(-max_shift, max_shift, 2) * size
    linear = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    linear = scale * linear @ np.array([[1.0, shear], [0.0, 1.0]])
    center = np.full(2, (size - 1) / 2)
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = center - linear @ center + shift
    return matrix


def grid_error(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Mean distance (px) between where two matrices send a 5x5 grid over the central 60% of the image.

    Args:
        a: ``(3, 3)`` matrix.
        b: ``(3, 3)`` matrix.
        size: image side in pixels.

    Returns:
        The mean distance.
    """
    ticks = np.linspace(0.2 * (size - 1), 0.8 * (size - 1), 5)
    xs, ys = np.meshgrid(ticks, ticks)
    points = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    return float(np.linalg.norm((a @ points - b @ points)[:2], axis=0).mean())


def displace(image: np.ndarray, matrix: np.ndarray, fill: float) -> np.ndarray:
    """``out(x) = image(matrix @ x)`` with a constant fill."""
    shape = image.shape[:2]
    return warp_rgb(image, RegistrationResult("affine", matrix, matrix, 1.0, shape, shape, shape), fill=fill)


def _similarity_errors(
    result: RegistrationResult, reference: RegistrationResult, known: np.ndarray, size: int
) -> dict[str, float]:
    """Both errors of the similarity stage alone (before the affine stage) and of the coarse similarity (before the
    pyramid), when the result records them."""

    def full(r: RegistrationResult, key: str) -> np.ndarray:
        to_low = np.diag([r.scale, r.scale, 1.0])
        to_low[:2, 2] = 0.5 * r.scale - 0.5
        return np.linalg.inv(to_low) @ np.asarray(r.details[key]) @ to_low

    out = {}
    for stage, key in (
        ("similarity", "similarity_matrix_registration_resolution"),
        ("coarse", "coarse_matrix_registration_resolution"),
    ):
        if key in result.details and key in reference.details:
            matrix = full(result, key)
            out[f"error_{stage}"] = grid_error(matrix, np.linalg.inv(known), size)
            out[f"consistency_{stage}"] = grid_error(matrix, np.linalg.inv(known) @ full(reference, key), size)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    """Register every displaced pair of the part (one row per displaced pair), then the unrelated controls."""
    second = None if args.second_channel == "none" else args.second_channel
    registration = PairRegistration(
        transform=args.transform,
        channel=args.channel,
        max_side=args.max_side,
        starts=args.starts,
        second_channel=second,
        method=args.method,
        affine_min_gain=args.affine_min_gain,
        inverse_check=args.inverse_check == "true",
        pyramid_max_side=args.pyramid_max_side,
        candidates=args.search_candidates,
        mask_fill=args.mask_fill == "true",
        overlap_weight=args.overlap_weight,
        block_matching=args.block_matching == "true",
    )
    rng = np.random.default_rng(args.seed)
    rows = []
    pairs = real_pairs(args.part)
    for pair in pairs if args.displaced == "true" else []:
        for size in draw_sizes(args.sizes):
            if size not in args.sizes:  # drawn all the same: --sizes 1024 keeps the default run's draws
                for _ in range(args.per_pair):
                    random_displacement(rng, size, args.max_angle, args.max_shift)
                continue
            he = np.asarray(Image.fromarray(pair.he).resize((size, size), Image.BILINEAR))
            ihc = np.asarray(Image.fromarray(pair.ihc).resize((size, size), Image.BILINEAR))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RegistrationWarning)
                reference = registration(he, ihc) if _selected(pair.id, args.pairs) else None
                for k in range(args.per_pair):
                    known = random_displacement(rng, size, args.max_angle, args.max_shift)
                    if not _selected(pair.id, args.pairs):  # drawn all the same: the other pairs keep their draws
                        continue
                    fill = 255.0 if k % 2 == 0 else 0.0
                    start = time.perf_counter()
                    result = registration(he, displace(ihc, known, fill))
                    seconds = time.perf_counter() - start
                    target = np.linalg.inv(known) @ reference.matrix
                    rows.append(
                        {
                            "pair": pair.id,
                            "source": pair.source,
                            "size": size,
                            "fill": "white" if fill else "black",
                            "angle": math.degrees(math.atan2(known[1, 0], known[0, 0])),
                            "error": grid_error(result.matrix, np.linalg.inv(known), size),
                            "consistency": grid_error(result.matrix, target, size),
                            **_similarity_errors(result, reference, known, size),
                            "reference_offset": grid_error(reference.matrix, np.eye(3), size),
                            "reference_verdict": reference.verdict,
                            "verdict": result.verdict,
                            "reasons": ",".join(result.verdict_reasons),
                            "matrix": result.matrix.tolist(),
                            "status": result.status,
                            "method": args.method,
                            **result.details["verdict_measures"],
                            "seconds": seconds,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{r['pair']:28s} {size:5d} {r['fill']:5s} angle {r['angle']:6.1f}  error {r['error']:7.2f} px"
                        f"  consistency {r['consistency']:6.2f} (ref offset {r['reference_offset']:5.2f} "
                        f"{r['reference_verdict']})  "
                        + " ".join(f"{k} {v:.3f}" for k, v in result.details["verdict_measures"].items())
                        + f"  {r['verdict']:10s} {r['reasons']}  {seconds:.1f} s",
                        flush=True,
                    )
    if args.unrelated == "true":
        rows += unrelated_rows(registration, pairs, args)
    return rows


#: The sizes a default run registers, in its order. Their draws are made whatever ``--sizes`` selects, so that a run
#: on some of them meets the same displacements as the default run (as ``--pairs`` does for pairs).
DEFAULT_SIZES = (1024, 512)


def draw_sizes(sizes: list[int]) -> list[int]:
    """The sizes to draw displacements for, in order: the default ones, then any other of ``sizes``."""
    return list(DEFAULT_SIZES) + [size for size in sizes if size not in DEFAULT_SIZES]


def _selected(pair_id: str, wanted: list[str]) -> bool:
    """Whether ``--pairs`` (substrings of pair ids; empty: all) selects this pair."""
    return not wanted or any(w in pair_id for w in wanted)


def unrelated_rows(registration: PairRegistration, pairs: list, args: argparse.Namespace) -> list[dict]:
    """The control: each H&E against the IHC of the next pair of the part (another section, another case), displaced
    once; nothing there can be aligned, so a verdict other than ``uncertain`` / ``failed`` is a miss."""
    rng = np.random.default_rng(args.seed + 1)  # its own stream: the displaced rows stay the same with or without it
    rows = []
    for index, pair in enumerate(pairs):
        other = pairs[(index + 1) % len(pairs)]
        for size in draw_sizes(args.sizes):
            known = random_displacement(rng, size, args.max_angle, args.max_shift)
            if size not in args.sizes or not _selected(pair.id, args.pairs):
                continue
            he = np.asarray(Image.fromarray(pair.he).resize((size, size), Image.BILINEAR))
            ihc = np.asarray(Image.fromarray(other.ihc).resize((size, size), Image.BILINEAR))
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RegistrationWarning)
                result = registration(he, displace(ihc, known, 255.0))
            row = {
                "kind": "unrelated",
                "pair": f"{pair.id} + {other.id} IHC",
                "source": pair.source,
                "size": size,
                "verdict": result.verdict,
                "reasons": ",".join(result.verdict_reasons),
                "status": result.status,
                "method": args.method,
                **result.details["verdict_measures"],
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"unrelated {row['pair']:52s} {size:5d}  {row['verdict']:10s} {row['reasons']}  "
                + " ".join(f"{k} {v:.3f}" for k, v in result.details["verdict_measures"].items()),
                flush=True,
            )
    return rows


def summarise(rows: list[dict]) -> None:
    """Print, for both error definitions, the distribution and verdict counts per source and size, how the verdict
    predicts large errors, and how many unrelated controls it flags."""
    controls = [r for r in rows if r.get("kind") == "unrelated"]
    rows = [r for r in rows if r.get("kind") != "unrelated"]
    if controls:
        flagged = sum(r["verdict"] != "registered" for r in controls)
        print(f"unrelated pairs (another case's IHC) flagged uncertain or failed: {flagged} of {len(controls)}")
    if not rows:
        return
    for key, meaning in (
        ("error", "error: vs the inverse of the known displacement (includes the pair's own misalignment)"),
        (
            "consistency",
            "consistency: vs the method's own result on the undisplaced pair (does the displacement change it?)",
        ),
    ):
        print(f"\n{meaning}")
        groups = defaultdict(list)
        for row in rows:
            groups[(row["source"], row["size"])].append(row)
        print(
            "| source | size | n | median px | p90 px | max px | < 5 px | > 20 px | registered / uncertain / failed |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for (source, size), group in sorted(groups.items()):
            e = np.array([r[key] for r in group])
            verdicts = [r["verdict"] for r in group]
            counts = " / ".join(str(verdicts.count(v)) for v in ("registered", "uncertain", "failed"))
            print(
                f"| {source} | {size} | {len(e)} | {np.median(e):.2f} | {np.percentile(e, 90):.2f} | {e.max():.2f} | "
                f"{(e < 5).sum()} ({100 * (e < 5).mean():.0f}%) | {(e > 20).sum()} | {counts} |"
            )
        errors = np.array([r[key] for r in rows])
        flagged = np.array([r["verdict"] != "registered" for r in rows])
        large, good = errors > 20, errors < 5
        print(
            f"verdict: large errors (> 20 px) caught {int((flagged & large).sum())} of {int(large.sum())}; "
            f"good registrations (< 5 px) flagged {int((flagged & good).sum())} of {int(good.sum())}"
        )
    # the affine stage's and the pyramid's worth
    for key in ("error_similarity", "consistency_similarity", "error_coarse", "consistency_coarse"):
        if all(key in r for r in rows):
            for size in sorted({r["size"] for r in rows}):
                e = np.array([r[key] for r in rows if r["size"] == size])
                print(
                    f"{key} at {size}: median {np.median(e):.2f} px, "
                    f"< 5 px {(e < 5).sum()} of {len(e)}, > 20 px {(e > 20).sum()}"
                )
    seconds = np.array([r["seconds"] for r in rows])
    print(f"\n{np.mean(seconds):.1f} s per registration (median {np.median(seconds):.1f}, max {seconds.max():.1f})")


#: Candidate verdict measures and the direction that means "suspect" (larger or smaller), with thresholds to try.
CANDIDATES = {
    "inverse_consistency_px": ("max", (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)),
    "channel_drift_px": ("max", (0.5, 1.0, 2.0, 3.0)),
    "coarse_drift_px": ("max", (1.0, 2.0, 3.0, 5.0)),
    "margin": ("min", (0.05, 0.1, 0.2)),
    "ncc": ("min", (0.1, 0.15, 0.2)),
    "pyramid_drift_px": ("max", (0.5, 1.0, 2.0)),
    "fine_ncc": ("min", (0.1, 0.12, 0.15)),
    "fine_margin": ("min", (0.02, 0.05, 0.1)),
    "fine_channel_margin": ("min", (-0.01, -0.005, 0.0, 0.005)),
}


def compare_measures(rows: list[dict], key: str = "error") -> None:
    """For each candidate verdict measure and threshold: large errors (> 20 px) caught and good registrations
    (< 5 px) flagged, on ``key``; how the verdict rule is chosen on tune."""
    # an unrelated control counts as a large error: nothing can be aligned there
    errors = np.array([math.inf if r.get("kind") == "unrelated" else r[key] for r in rows])
    large, good = errors > 20, errors < 5
    controls = sum(r.get("kind") == "unrelated" for r in rows)
    print(
        f"\nverdict candidates on {key}: {int(large.sum())} large (> 20 px; {controls} of them unrelated controls), "
        f"{int(good.sum())} good (< 5 px)"
    )
    current = np.array([r["verdict"] != "registered" for r in rows])
    print(
        f"current rule: caught {int((current & large).sum())} of {int(large.sum())}, "
        f"flagged {int((current & good).sum())} of {int(good.sum())}"
    )
    print("| measure | flagged when | caught large | flagged good | or current rule: caught | flagged good |")
    print("|---|---|---|---|---|---|")
    for name, (bound, thresholds) in CANDIDATES.items():
        if not all(name in r for r in rows):
            continue
        values = np.array([r[name] for r in rows])
        for threshold in thresholds:
            flagged = values > threshold if bound == "max" else values < threshold
            sign = ">" if bound == "max" else "<"
            either = flagged | current
            print(
                f"| {name} | {sign} {threshold} | {int((flagged & large).sum())} of {int(large.sum())} | "
                f"{int((flagged & good).sum())} of {int(good.sum())} | {int((either & large).sum())} | "
                f"{int((either & good).sum())} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("tune", "report"), default="tune")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        help="image sides to register at (the default sizes' draws stay the same whichever are selected)",
    )
    parser.add_argument("--per_pair", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_angle", type=float, default=15.0)
    parser.add_argument("--max_shift", type=float, default=0.1)
    parser.add_argument("--transform", default="affine", help="affine also records the similarity stage alone")
    parser.add_argument("--channel", default="tissue")
    parser.add_argument("--max_side", type=int, default=256)
    parser.add_argument("--starts", type=int, default=3, help="global-search starts per channel")
    parser.add_argument("--search_candidates", type=int, default=4, help="ncc method: global-search starts refined")
    parser.add_argument("--mask_fill", default="true", help="true/false: leave the fill out (ncc method)")
    parser.add_argument("--overlap_weight", type=float, default=1.0, help="ncc method: ranking by NCC x overlap^w")
    parser.add_argument("--block_matching", default="true", help="true/false: block-matching estimate (ncc)")
    parser.add_argument("--second_channel", default="od", help="second channel, or none (itk method)")
    parser.add_argument("--method", default="ncc", help="ncc (default) or itk (the earlier method)")
    parser.add_argument("--affine_min_gain", type=float, default=0.0, help="NCC gain an affine stage must bring")
    parser.add_argument("--inverse_check", default="true", help="true/false: register both ways (ncc method)")
    parser.add_argument(
        "--pyramid_max_side", type=int, default=1024, help="ncc method: finest refinement side (<= max_side: none)"
    )
    parser.add_argument(
        "--stage",
        default="final",
        help="with --rescore: final, similarity (the similarity stage's errors) or coarse (before the pyramid)",
    )
    parser.add_argument("--candidates", action="store_true", help="also compare candidate verdict measures")
    parser.add_argument(
        "--pairs", nargs="*", default=[], help="only pairs whose id contains one of these (the draws stay the same)"
    )
    parser.add_argument("--displaced", default="true", help="true/false: register the displaced pairs")
    parser.add_argument("--unrelated", default="true", help="true/false: also the unrelated controls")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument(
        "--rescore", nargs="*", default=[], help="summarise the rows of these JSON files with the current verdict"
    )
    args = parser.parse_args()
    if args.rescore:
        rows = [row for name in args.rescore for row in json.loads(Path(name).read_text())]
        for row in rows:  # the verdict of the current thresholds, from the stored measurements
            status = row.get("status") or ("identity" if row["reasons"].startswith("no alignment") else "registered")
            row["verdict"], reasons = _verdict(row, status, row.get("method", "ncc"))
            row["reasons"] = ",".join(reasons)
            # score that stage alone (the verdict measures are the same)
            if args.stage in ("similarity", "coarse") and row.get("kind") != "unrelated":
                row["error"], row["consistency"] = row[f"error_{args.stage}"], row[f"consistency_{args.stage}"]
    else:
        rows = run(args)
    summarise(rows)
    if args.candidates:
        for key in ("error", "consistency"):
            compare_measures(rows, key)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
