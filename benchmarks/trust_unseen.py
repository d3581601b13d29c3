"""The bundle's safety promises, end to end, on the sealed split of the real images: tune and report side by side.

Every real image of ``benchmarks/sealed_split.py`` goes through ``predict`` as a user would call it, with a trained
bundle (by default README command 1's demo model in ``bundle/``):

* **selector**: each tissue image given as ``--image`` (stain unknown): share called the right stain, share referred
  ``stain_uncertain``, and how many were *scored as the other stain* (called wrong and not referred);
* **out of distribution**: each real pair as ``dual``, each H&E as ``he_only`` and each IHC as ``ihc_only`` with the
  stain declared: share referred for ``out_of_distribution`` (the demo model must refuse real tissue), and share
  given a score with no referral at all;
* **never scored**: background tiles (near-empty glass, pen on glass, a coverslip line) and pen-marked tissue must get
  no score (``score`` null), whether the stain is declared or not; a wrong-marker IHC (scikit-image's FHL2) must never
  be scored without referral.

The choices behind these figures (selector features, OOD score and its thresholds, tissue/ink/marker thresholds) are
made on the ``tune`` part, on the demo data, or from the physics; the ``report`` part is only scored. Leave-one-source-
out figures of each fitted choice are printed by the component benchmarks (``trust_inputs.py``, ``trust_ood.py``,
``eval_selector_transfer.py``).

Usage::

    python benchmarks/trust_unseen.py [--bundle_root bundle] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sealed_split import PARTS, real_images, real_pairs  # noqa: E402

from her2_monai.inference import load_predictor  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"


def _save(image: np.ndarray, folder: Path, name: str) -> str:
    path = folder / (name.replace("/", "__") + ".png")
    Image.fromarray(image).save(path)
    return str(path)


class Tally:
    """Counts of one figure per part (and per source), printed as ``hits/total (share)``."""

    def __init__(self) -> None:
        self.hits: dict[tuple[str, str], int] = defaultdict(int)
        self.total: dict[tuple[str, str], int] = defaultdict(int)
        self.cases: dict[tuple[str, bool], list[str]] = defaultdict(list)

    def add(self, part: str, source: str, hit: bool, case: str) -> None:
        for key in ((part, "*"), (part, source)):
            self.total[key] += 1
            self.hits[key] += int(hit)
        self.cases[(part, hit)].append(case)

    def cell(self, part: str, source: str = "*") -> str:
        total = self.total.get((part, source), 0)
        return (
            f"{self.hits[(part, source)]}/{total} ({100.0 * self.hits[(part, source)] / total:.1f}%)" if total else "-"
        )

    def share(self, part: str) -> float | None:
        total = self.total.get((part, "*"), 0)
        return self.hits[(part, "*")] / total if total else None


def evaluate(bundle_root: str) -> dict[str, Tally]:
    """Run every check on both parts; ``name -> Tally``."""
    predictor = load_predictor(bundle_root, CONFIG)
    tallies: dict[str, Tally] = defaultdict(Tally)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for im in real_images():
            path = _save(im.image, folder, im.id)
            if im.category == "tissue":
                unknown = predictor.predict(image=path)
                right = unknown["detected_stains"] == [im.stain]
                unsure = "stain_uncertain" in unknown["refer_reasons"]
                tallies["selector: right stain"].add(im.part, im.source, right, im.id)
                tallies["selector: wrong and scored"].add(
                    im.part, im.source, not right and not unsure and unknown["score"] is not None, im.id
                )
                declared = predictor.predict(**{im.stain: path})
                scenario = f"{im.stain}_only"
                tallies[f"OOD refused: {scenario}"].add(
                    im.part, im.source, "out_of_distribution" in declared["refer_reasons"], im.id
                )
                tallies[f"scored, no referral: {scenario}"].add(
                    im.part, im.source, declared["score"] is not None and not declared["refer"], im.id
                )
            elif im.category in ("background", "pen"):
                answers = [predictor.predict(image=path), predictor.predict(he=path)]
                tallies[f"never scored: {im.category}"].add(
                    im.part, im.source, all(a["score"] is None for a in answers), im.id
                )
                tallies[f"never scored unreferred: {im.category}"].add(
                    im.part, im.source, all(a["score"] is None or a["refer"] for a in answers), im.id
                )
            elif im.category == "wrong_marker":
                answers = [predictor.predict(ihc=path), predictor.predict(image=path)]
                tallies["wrong marker: referred"].add(im.part, im.source, all(a["refer"] for a in answers), im.id)
        for pair in real_pairs():
            he, ihc = _save(pair.he, folder, pair.id + "_he"), _save(pair.ihc, folder, pair.id + "_ihc")
            dual = predictor.predict(he=he, ihc=ihc)
            tallies["OOD refused: dual"].add(
                pair.part, pair.source, "out_of_distribution" in dual["refer_reasons"], pair.id
            )
            tallies["scored, no referral: dual"].add(
                pair.part, pair.source, dual["score"] is not None and not dual["refer"], pair.id
            )
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", default="bundle", help="trained bundle folder (holds models/model.pt)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--sources", action="store_true", help="one column per source as well")
    args = parser.parse_args()
    tallies = evaluate(args.bundle_root)
    width = max(len(name) for name in tallies) + 2
    print(f"{'figure':{width}s}" + "".join(f"{part:>22s}" for part in PARTS))
    for name in sorted(tallies):
        print(f"{name:{width}s}" + "".join(f"{tallies[name].cell(part):>22s}" for part in PARTS))
    if args.sources:
        for name in sorted(tallies):
            cells = sorted((part, src) for (part, src) in tallies[name].total if src != "*")
            print(f"  {name}: " + ", ".join(f"{src} ({part}) {tallies[name].cell(part, src)}" for part, src in cells))
    for name in sorted(tallies):
        bad = name.startswith("scored") or "wrong and scored" in name  # a hit is a failure for these figures
        for part in PARTS:
            if cases := tallies[name].cases.get((part, bad)):
                print(f"{'cases' if bad else 'misses'} of '{name}' ({part}): {', '.join(cases[:12])}")
    if args.json:
        out = {name: {part: tallies[name].share(part) for part in PARTS} for name in tallies}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
