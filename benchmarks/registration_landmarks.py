"""Registration error measured on landmarks: corresponding points a person placed on both sections.

The displaced-pair benchmark (``registration_robustness.py``) scores a registration against the dataset's own
alignment, which consecutive sections do not have to the pixel. Landmarks score the registration itself (the target
registration error, TRE). This script registers every case of a folder with the ``register`` command's defaults and
prints the TRE per case, its distribution, and how the verdict predicts a large TRE.

Layout: one folder per case under ``CASES``, each holding

- ``he.<ext>`` and ``ihc.<ext>``: the two sections at the same pixel size (any format ``register`` reads; export a
  whole-slide image at a level of a few thousand px first);
- ``he.csv`` and ``ihc.csv``: the landmarks, ImageJ / ANHIR layout (``,X,Y``, pixel x = column, y = row), row i of
  each the same place;
- optionally ``case.json``: ``{"landmark_scale": 0.25, "mpp": 0.92}``: the factor from landmark to image pixels
  (landmarks placed on level 0, images exported 4x smaller), and the images' microns per pixel (the TRE is then also
  given in um).

ANHIR (Borovec et al., IEEE TMI 2020) and ACROBAT (H&E and IHC, including HER2, of breast cancer; Weitz et al.) publish
such landmarks. Run::

    python benchmarks/registration_landmarks.py CASES [--max_side 256] [--pyramid_max_side 1024] [--json tre.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from her2_monai.data.datalist import IMAGE_SUFFIXES
from her2_monai.data.image_reader import read_rgb
from her2_monai.registration import PairRegistration, RegistrationWarning
from her2_monai.registration.landmarks import landmark_errors, landmark_summary, read_landmark_pair


def _image(folder: Path, stem: str) -> Path:
    found = [p for p in sorted(folder.glob(f"{stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(found) != 1:
        suffixes = "/".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"{folder}: expected one {stem} image ({suffixes}), found {len(found)}")
    return found[0]


def find_cases(root: Path) -> list[Path]:
    """The case folders under ``root`` (``root`` itself when it is one), sorted.

    Raises:
        ValueError: when there is none, or a case lacks a file.
    """
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    candidates = [root] if (root / "he.csv").exists() else sorted(p for p in root.iterdir() if p.is_dir())
    cases = [p for p in candidates if any(p.glob("*.csv"))]
    if not cases:
        raise ValueError(f"{root}: no case (a folder holding he.<image>, ihc.<image>, he.csv and ihc.csv)")
    for case in cases:
        for name in ("he.csv", "ihc.csv"):
            if not (case / name).is_file():
                raise ValueError(f"{case}: {name} is missing (each case holds he.csv and ihc.csv)")
        for stem in ("he", "ihc"):
            _image(case, stem)
    return cases


def score_case(case: Path, registration: PairRegistration) -> dict:
    """Register one case and measure its landmarks."""
    meta = json.loads((case / "case.json").read_text()) if (case / "case.json").is_file() else {}
    factor = float(meta.get("landmark_scale", 1.0))
    he_points, ihc_points = (points * factor for points in read_landmark_pair(case / "he.csv", case / "ihc.csv"))
    he, ihc = read_rgb(_image(case, "he")), read_rgb(_image(case, "ihc"))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        result = registration(he, ihc)
    seconds = time.perf_counter() - start
    before = np.linalg.norm(he_points - ihc_points, axis=1)
    row = {
        "case": case.name,
        **landmark_summary(landmark_errors(result, he_points, ihc_points), before, he.shape),
        "verdict": result.verdict,
        "reasons": ",".join(result.verdict_reasons),
        "seconds": seconds,
    }
    if "mpp" in meta:
        row["median_um"] = row["median_px"] * float(meta["mpp"])
    return row


def summarise(rows: list[dict], good: float, large: float) -> None:
    """Print the distribution of the cases' median TRE and how the verdict predicts a large one."""
    medians = np.array([r["median_px"] for r in rows])
    flagged = np.array([r["verdict"] != "registered" for r in rows])
    is_good, is_large = medians < good, medians > large
    print(
        f"\n{len(rows)} cases: median TRE (of the per-case medians) {np.median(medians):.2f} px; "
        f"median TRE < {good:g} px: {int(is_good.sum())} of {len(rows)}; > {large:g} px: {int(is_large.sum())}"
    )
    print(
        f"verdict: large (> {large:g} px) caught {int((flagged & is_large).sum())} of {int(is_large.sum())}; "
        f"good (< {good:g} px) flagged {int((flagged & is_good).sum())} of {int(is_good.sum())}"
    )
    print(f"{np.mean([r['seconds'] for r in rows]):.1f} s per registration")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", type=Path, help="folder of case folders (or one case folder)")
    parser.add_argument("--transform", default="affine")
    parser.add_argument("--method", default="ncc")
    parser.add_argument("--channel", default="tissue")
    parser.add_argument("--max_side", type=int, default=256)
    parser.add_argument("--pyramid_max_side", type=int, default=1024)
    parser.add_argument("--good", type=float, default=5.0, help="a case is good below this median TRE (px)")
    parser.add_argument("--large", type=float, default=20.0, help="a case is a large error above this median TRE")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        cases = find_cases(args.cases)
        registration = PairRegistration(
            transform=args.transform,
            method=args.method,
            channel=args.channel,
            max_side=args.max_side,
            pyramid_max_side=args.pyramid_max_side,
        )
        rows = []
        for case in cases:
            rows.append(score_case(case, registration))
            r = rows[-1]
            micro = f" ({r['median_um']:.1f} um)" if "median_um" in r else ""
            print(
                f"{r['case']:24s} {r['points']:4d} landmarks  TRE median {r['median_px']:7.2f} px{micro}  "
                f"max {r['max_px']:7.2f}  (before {r['median_before_px']:7.2f})  {r['verdict']:10s} {r['reasons']}  "
                f"{r['seconds']:.1f} s",
                flush=True,
            )
    except ValueError as err:
        print(f"registration_landmarks: {err}", file=sys.stderr)
        return 2
    summarise(rows, args.good, args.large)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
