"""Which out-of-distribution score keeps a model from scoring tissue unlike its training data? The sealed protocol.

For a model and its datalist (by default the demo model of README command 1: ``bundle/models/model.pt`` and
``bundle/eval/datalist.json``), every candidate score is fitted on the training split and thresholded on the
validation split alone (per scenario, as the bundle stores it). In distribution: the validation and test splits. Out
of distribution: every real tissue image of ``../shared/data`` split by :mod:`sealed_split` -- the registered pairs
in all three scenarios (dual, H&E only, IHC only), each single image in its own stain's scenario; background tiles
(no tissue) are left out, the tissue check refuses them before any score. Printed per candidate and scenario, the
``tune`` and ``report`` parts side by side:

* ``val`` / ``test``: share of validation / test cases that pass (at least 0.95 is the goal);
* ``tune`` / ``report``: share of real images refused (at least 0.95 is the goal);
* ``gap``: how far beyond the threshold the *least* unusual real image of the part lies, in units of the threshold's
  distance from the validation median (``> 1`` refused; larger = a wider safety margin for images never seen).

Families: the classifier's outputs (``msp``, ``energy``, ``mahalanobis`` on the pooled embedding, ``knn`` on the
normalised embedding), the shared encoder's stage statistics (``stage_stats``), the input's stain and texture
statistics (``image_stats``, on the model input and -- ``image_stats@original`` -- on the image as read, before the
resize), the CM-GAN's cycle error (``cycle``), and unions. Then the choice: the deployable candidate (not
``@original``: the deployed model sees the resized input) with the highest smallest refusal rate on ``tune`` among
those that pass at least 95% of the validation and test cases in every scenario (ties: fewer members, then the larger
smallest gap on ``tune``); the same rule leaving out each real source in turn
(leave-one-source-out: chosen without source S, scored on S); and the chosen candidate's threshold margin.

Usage::

    python benchmarks/trust_ood.py [--bundle_root bundle] [--datalist D] [--pass_rate 0.95] [--margin 1.0]
        [--plain_quantile] [--real_holdout] [--json out.json]

``--real_holdout`` adds the check that the score comes from the data, not from the model's provenance: the same
detector fitted on real BCI crops passes the crops of a real pair it never saw (leave-one-pair-out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Resized, ScaleIntensityRanged
from sealed_split import SOURCES, real_images, real_pairs
from sklearn.metrics import roc_auc_score

from her2_monai.calibration.ood import OODScore, UnionScore, build_ood, ood_threshold
from her2_monai.calibration.ood_features import (
    CYCLE_ERROR,
    IMAGE_STATS,
    STAGE_STATS,
    STAIN_SLOTS,
    ImageStatistics,
    classify_with_ood_inputs,
    slot_key,
)
from her2_monai.constants import SCENARIOS
from her2_monai.data.datalist import load_datalist_split
from her2_monai.networks.factory import build_model
from her2_monai.stain_batch import prepare_stain_batch, scenario_inputs
from her2_monai.transforms import FillMissingStainsd, LoadStainsd

KEYS = ("he", "ihc")
INPUTS = (
    "logits",
    "embedding",
    *(slot_key(f, s) for f in (IMAGE_STATS, STAGE_STATS, CYCLE_ERROR) for s in STAIN_SLOTS),
)
ORIGINAL = "original"  # the image statistics of the image as read, before the resize

#: candidate -> (unfitted score factory, statistics variant)
CANDIDATES: dict[str, tuple[Callable[[], OODScore], str]] = {
    "msp": (lambda: build_ood("msp"), "input"),
    "energy": (lambda: build_ood("energy"), "input"),
    "mahalanobis": (lambda: build_ood("mahalanobis", components=64), "input"),
    "knn": (lambda: build_ood("knn", k=5), "input"),
    "stage_stats": (lambda: build_ood("stage_stats"), "input"),
    "image_stats": (lambda: build_ood("image_stats"), "input"),
    "image_stats@original": (lambda: build_ood("image_stats"), ORIGINAL),
    "cycle": (lambda: build_ood("cycle"), "input"),
    "union(image,mahalanobis)": (lambda: UnionScore(["image_stats", "mahalanobis"]), "input"),
    "union(image,knn)": (lambda: UnionScore(["image_stats", "knn"]), "input"),
    "union(image,stages)": (lambda: UnionScore(["image_stats", "stage_stats"]), "input"),
    "union(image,cycle)": (lambda: UnionScore(["image_stats", "cycle"]), "input"),
    "union(all)": (lambda: UnionScore(["image_stats", "stage_stats", "mahalanobis", "knn", "cycle"]), "input"),
}


def preprocessing(size: int | None) -> Compose:
    """The bundle's evaluation chain (load, area resize to ``size``, scale to ``[-1, 1]``, fill); no resize: None."""
    resize = [Resized(KEYS, spatial_size=(size, size), mode="area", allow_missing_keys=True)] if size else []
    return Compose(
        [
            LoadStainsd(KEYS),
            *resize,
            ScaleIntensityRanged(KEYS, 0.0, 255.0, -1.0, 1.0, clip=True, allow_missing_keys=True),
            FillMissingStainsd(KEYS),
        ]
    )


@torch.no_grad()
def collect(net: torch.nn.Module, records: Sequence[Mapping], size: int) -> dict[str, dict[str, np.ndarray]]:
    """``{scenario: {input name: (N, D), "index": (N,), "label": (N,)}}`` of every scenario a record allows."""
    loader = DataLoader(Dataset(list(records), preprocessing(size)), batch_size=16, num_workers=0)
    parts: dict[str, dict[str, list]] = {s: {} for s in SCENARIOS}
    statistics = ImageStatistics()
    offset = 0
    for batchdata in loader:
        batch = prepare_stain_batch(batchdata, "cpu")
        index = torch.arange(offset, offset + batch["mask"].shape[0])
        offset += len(index)
        for scenario in SCENARIOS:
            selected, he, ihc, mask = scenario_inputs(batch["he"], batch["ihc"], batch["mask"], scenario)
            if not bool(selected.any()):
                continue
            _, got = classify_with_ood_inputs(net, he, ihc, mask, INPUTS, image_statistics=statistics)
            got["index"] = index[selected].numpy()
            got["label"] = batch["label"][selected].numpy()
            for key, value in got.items():
                parts[scenario].setdefault(key, []).append(value)
    return {s: {k: np.concatenate(v) for k, v in p.items()} for s, p in parts.items() if p}


@torch.no_grad()
def original_statistics(records: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """``{stain: (N, D)}`` :class:`ImageStatistics` of each record's images as read (NaN rows where absent)."""
    statistics, chain = ImageStatistics(), preprocessing(None)
    rows: dict[str, list[np.ndarray]] = {slot: [] for slot in STAIN_SLOTS}
    for record in records:
        data = chain(dict(record))
        for column, slot in enumerate(STAIN_SLOTS):
            present = bool(data["mask"][column] > 0)
            value = statistics(data[slot][None].float())[0].numpy() if present else None
            rows[slot].append(value if value is not None else np.full(statistics.num_features, np.nan))
    return {slot: np.stack(v).astype(np.float64) for slot, v in rows.items()}


def with_original(part: Mapping[str, np.ndarray], original: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A scenario part whose ``image_*`` inputs are the original-resolution statistics of the same images."""
    out = dict(part)
    for slot in STAIN_SLOTS:
        key = slot_key(IMAGE_STATS, slot)
        values = original[slot][part["index"]].copy()
        values[~np.isfinite(part[key]).all(axis=1)] = np.nan  # the scenario hides this stain
        out[key] = values
    return out


def real_records() -> tuple[list[dict], list[str]]:
    """Every real tissue image as records (pairs with both stains, single images alone) and each one's source."""
    records, sources = [], []
    for pair in real_pairs():
        records.append({"he": pair.he, "ihc": pair.ihc, "label": 0})
        sources.append(pair.source)
    for image in real_images():
        if image.stain is None or image.source in ("bci", "mist"):  # background; pair halves are in the pairs
            continue
        records.append({"he": image.image if image.stain == "he" else None, "label": 0})
        if image.stain == "ihc":
            records[-1] = {"ihc": image.image, "he": None, "label": 0}
        sources.append(image.source)
    return records, sources


def pooled(parts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = next(iter(parts.values())).keys()
    return {k: np.concatenate([p[k] for p in parts.values()]) for k in keys}


def evaluate(
    data: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    sources: np.ndarray,
    pass_rate: float,
    margin: float,
    finite_sample: bool,
) -> dict[str, dict]:
    """Per candidate and scenario: pass rates, refusals per real source, AUROC and each real case's gap."""
    results = {}
    for name, (factory, variant) in CANDIDATES.items():
        parts = data[variant]
        score = factory()
        train = pooled(parts["training"])
        try:
            score.fit_inputs(train, train["label"])
        except ValueError as err:  # e.g. a network without a CM-GAN for 'cycle'
            results[name] = {"error": str(err)}
            continue
        per: dict[str, dict] = {}
        for scenario in SCENARIOS:
            if scenario not in parts["real"]:
                continue
            val, test, real = (score.score_inputs(parts[s][scenario]) for s in ("validation", "test", "real"))
            threshold = ood_threshold(val, pass_rate, margin, finite_sample)
            median = float(np.nanmedian(val))
            spread = threshold - median if np.isfinite(threshold) and threshold > median else np.inf
            real_sources = sources[parts["real"][scenario]["index"]]
            y = np.r_[np.zeros(len(test)), np.ones(len(real))]
            finite = np.isfinite(np.r_[test, real])
            per[scenario] = {
                "threshold": threshold,
                "val_pass": float(np.mean(~(val > threshold))),
                "test_pass": float(np.mean(~(test > threshold))),
                "auroc": float(roc_auc_score(y[finite], np.r_[test, real][finite])),
                "real": [
                    {"source": str(s), "refused": bool(r > threshold), "gap": float((r - median) / spread)}
                    for s, r in zip(real_sources, real)
                ],
            }
        results[name] = per
    return results


def refusal(per: Mapping[str, dict], scenario: str, keep: Callable[[str], bool]) -> tuple[float, float, int]:
    """(share refused, smallest gap, n) of the real cases of a scenario whose source ``keep`` accepts."""
    rows = [r for r in per[scenario]["real"] if keep(r["source"])]
    if not rows:
        return float("nan"), float("nan"), 0
    return float(np.mean([r["refused"] for r in rows])), float(min(r["gap"] for r in rows)), len(rows)


def choose(results: Mapping[str, dict], keep: Callable[[str], bool], floor: float = 0.95) -> str:
    """The rule of the module docstring, on the real sources ``keep`` accepts, among the deployable candidates."""
    ranked = []
    for name, per in results.items():
        if CANDIDATES[name][1] == ORIGINAL:  # HER2Deploy sees the resized model input, not the image as read
            continue
        if "error" in per or any(per[s]["val_pass"] < floor or per[s]["test_pass"] < floor for s in per):
            continue
        stats = [refusal(per, s, keep) for s in per]
        stats = [(r, g) for r, g, n in stats if n]
        score = CANDIDATES[name][0]()
        members = len(score.members) if isinstance(score, UnionScore) else 1
        ranked.append((min(r for r, _ in stats), -members, min(g for _, g in stats), name))
    return max(ranked)[-1] if ranked else ""


def real_holdout(size: int, pass_rate: float, margin: float, finite_sample: bool, tiles: int = 4) -> dict[str, float]:
    """The chosen detector fitted on *real* data passes held-out real data: leave-one-pair-out over the tune pairs.

    Each tune pair's images are cut into ``tiles x tiles`` crops, each resized to the model's ``size`` (as a patch of
    that field of view would be). For every held-out pair and every choice of 2 validation pairs among the rest, an
    ``image_stats`` score is fitted on the crops of the remaining pairs, thresholded on the validation pairs' crops
    (the bundle's rule) and applied to the held-out pair's crops.

    Returns:
        Share of held-out crops that pass, per scenario.
    """
    from itertools import combinations

    import torch.nn.functional as F

    statistics = ImageStatistics()

    def crops(image: np.ndarray) -> np.ndarray:
        side = image.shape[0] // tiles
        views = [
            image[y : y + side, x : x + side]
            for y in range(0, tiles * side, side)
            for x in range(0, tiles * side, side)
        ]
        x = torch.from_numpy(np.stack(views).astype(np.float32)).permute(0, 3, 1, 2)
        return statistics(F.interpolate(x, size=(size, size), mode="area") / 127.5 - 1.0).double().numpy()

    pairs = real_pairs("tune")
    he, ihc = [crops(p.he) for p in pairs], [crops(p.ihc) for p in pairs]

    def inputs(index: Sequence[int], scenario: str) -> dict[str, np.ndarray]:
        rows = {"he": np.concatenate([he[i] for i in index]), "ihc": np.concatenate([ihc[i] for i in index])}
        hidden = {"he_only": "ihc", "ihc_only": "he"}.get(scenario)
        if hidden:
            rows[hidden] = np.full_like(rows[hidden], np.nan)
        return {slot_key(IMAGE_STATS, slot): rows[slot] for slot in STAIN_SLOTS}

    passed: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    for held_out in range(len(pairs)):
        rest = [i for i in range(len(pairs)) if i != held_out]
        for validation in combinations(rest, 2):
            train = [i for i in rest if i not in validation]
            score = build_ood("image_stats").fit_inputs(inputs(train, "dual"))
            for scenario in SCENARIOS:
                val = score.score_inputs(inputs(validation, scenario))
                threshold = ood_threshold(val, pass_rate, margin, finite_sample)
                passed[scenario].append(float(np.mean(score.score_inputs(inputs([held_out], scenario)) <= threshold)))
    return {s: float(np.mean(v)) for s, v in passed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle_root", default="bundle")
    parser.add_argument("--datalist", default=None, help="default: <bundle_root>/eval/datalist.json")
    parser.add_argument("--pass_rate", type=float, default=0.95)
    parser.add_argument("--margin", type=float, default=1.0, help="threshold margin (the bundle's ood_margin)")
    parser.add_argument("--plain_quantile", action="store_true", help="no split-conformal rank (ood_finite_sample)")
    parser.add_argument("--real_holdout", action="store_true", help="also fit image_stats on real pairs (held out)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.bundle_root)
    datalist = Path(args.datalist or root / "eval" / "datalist.json")
    start = time.time()
    net = build_model(root / "models" / "model.pt").eval()
    size = int(net.metadata.get("image_size") or 64)
    splits = {s: load_datalist_split(datalist, s, require_label=True) for s in ("training", "validation", "test")}
    records, source_list = real_records()
    sources = np.asarray(source_list)
    splits["real"] = records
    data: dict[str, dict] = {"input": {}, ORIGINAL: {}}
    for split, recs in splits.items():
        data["input"][split] = collect(net, recs, size)
        original = original_statistics(recs)
        data[ORIGINAL][split] = {s: with_original(p, original) for s, p in data["input"][split].items()}
    collected = time.time() - start
    finite_sample = not args.plain_quantile
    results = evaluate(data, sources, args.pass_rate, args.margin, finite_sample)

    tune = lambda s: SOURCES[s] == "tune"  # noqa: E731
    report = lambda s: SOURCES[s] == "report"  # noqa: E731
    counts = {
        part: {s: refusal(next(iter(results.values())), s, keep)[2] for s in SCENARIOS}
        for part, keep in (("tune", tune), ("report", report))
    }
    rule = "split-conformal rank" if finite_sample else "quantile"
    print(
        f"model {root / 'models' / 'model.pt'} ({size} px), datalist {datalist}; threshold per scenario on validation: "
        f"{rule} {args.pass_rate}, margin {args.margin}; real images tune {counts['tune']}, report {counts['report']}"
    )
    header = f"{'candidate':<26}" + "".join(f"| {s:^37}" for s in SCENARIOS)
    print(header)
    print(f"{'':<26}" + "| val  test  tune  report  gap t/r  " * 3)
    for name, per in results.items():
        if "error" in per:
            print(f"{name:<26}| not available: {per['error']}")
            continue
        row = f"{name:<26}"
        for s in SCENARIOS:
            r_t, g_t, _ = refusal(per, s, tune)
            r_r, g_r, _ = refusal(per, s, report)
            v = per[s]
            row += f"| {v['val_pass']:.2f} {v['test_pass']:.2f}  {r_t:.2f}  {r_r:.2f}  {g_t:5.1f}/{g_r:<5.1f} "
        print(row)
    chosen = choose(results, tune)
    print(f"\nchosen on tune (highest smallest tune refusal, demo val/test pass >= 0.95): {chosen}")
    for part, keep in (("tune", tune), ("report", report)):
        line = ", ".join(f"{s} {refusal(results[chosen], s, keep)[0]:.2f}" for s in SCENARIOS)
        print(f"  {part:6s} refused: {line}")
    print("leave-one-source-out (chosen without S, refused share of S's images per scenario):")
    loso = {}
    for source in sorted(set(sources)):
        pick = choose(results, lambda s, left=source: s != left)
        shares = {s: refusal(results[pick], s, lambda x, left=source: x == left) for s in SCENARIOS}
        loso[source] = {"chosen": pick, **{s: v[0] for s, v in shares.items() if v[2]}}
        text = ", ".join(f"{s} {v[0]:.2f} (n={v[2]})" for s, v in shares.items() if v[2])
        print(f"  {source:11s} ({SOURCES[source]:6s}) chosen {pick}: {text}")
    print(f"threshold margin of {chosen} (val / test pass, tune / report refused, per scenario):")
    margins = {}
    for margin in (0.0, 0.5, 1.0, 2.0):
        per = evaluate(data, sources, args.pass_rate, margin, finite_sample)[chosen]
        margins[margin] = per
        cells = [
            f"{s} {per[s]['val_pass']:.2f}/{per[s]['test_pass']:.2f} "
            f"{refusal(per, s, tune)[0]:.2f}/{refusal(per, s, report)[0]:.2f}"
            for s in SCENARIOS
        ]
        print(f"  margin {margin:.1f}: " + "; ".join(cells))
    holdout = None
    if args.real_holdout:
        holdout = {}
        for tiles in (4, 1):
            holdout[tiles] = real_holdout(size, args.pass_rate, args.margin, finite_sample, tiles)
            print(
                f"image_stats fitted on real tune pairs ({tiles * tiles} view(s) per image; 3 pairs train, 2 validate, "
                "1 held out, every split): held-out views passing: "
                + ", ".join(f"{s} {v:.3f}" for s, v in holdout[tiles].items())
            )
    print(f"{collected:.0f} s to collect, {time.time() - start:.0f} s in all")
    if args.json:
        summary = {"results": results, "chosen": chosen, "leave_one_source_out": loso, "real_holdout": holdout}
        Path(args.json).write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
