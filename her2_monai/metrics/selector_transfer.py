"""Branch-selector transfer check: H&E vs IHC calls on real images shown at several magnifications and crop sizes.

A real patch (e.g. BCI's 1024 px at about 0.46 um/px) is downscaled by each ``scale`` (1, 0.5, 0.25: 20x, 10x, 5x
apparent magnification) and cut into square crops of each ``crop_size`` -- the views a whole-slide tiler or another
lab's patch extractor would hand the selector. With ``whole_sides`` the whole image is also given resized so that its
longer side is each of those sizes (``predict --image`` on a thumbnail or a low-magnification export: a dense field
squeezed into 256 px). Crops with too little tissue are left out (a tiler drops them too) and counted.
:func:`selector_view_accuracy` reports accuracy per (scale, crop size), the lowest probability given to the true
stain, and how many views the selector called uncertain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from her2_monai.stain_features import TISSUE_INDEX, StainFeatureExtractor

__all__ = ["WHOLE", "ScaledView", "ViewScore", "scaled_views", "tissue_fraction", "selector_view_accuracy", "cell_name"]

#: ``scale`` of a whole-image view (the image resized so that its longer side is ``crop_size``).
WHOLE = 0.0


@dataclass(frozen=True)
class ScaledView:
    """One crop of a real image at one scale.

    Attributes:
        source: the image's name.
        scale: downscale factor applied to the whole image first; :data:`WHOLE` for a whole-image view.
        crop_size: crop side in pixels (after scaling); for a whole-image view, its longer side.
        position: ``(y, x)`` of the crop in the scaled image.
        pixels: ``(3, crop, crop)`` float tensor in ``[-1, 1]``.
        stain: the true stain (0 = H&E, 1 = IHC).
    """

    source: str
    scale: float
    crop_size: int
    position: tuple[int, int]
    pixels: torch.Tensor
    stain: int


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 127.5 - 1.0


def _positions(length: int, crop: int, per_axis: int) -> list[int]:
    if length <= crop:
        return [0]
    return sorted({int(round(v)) for v in np.linspace(0, length - crop, per_axis)})


def tissue_fraction(view: torch.Tensor) -> float:
    """Share of pixels of a ``(3, H, W)`` view in ``[-1, 1]`` whose optical density marks them as tissue."""
    extractor = StainFeatureExtractor(white_pool=max(1, min(4, *view.shape[-2:])))
    with torch.no_grad():
        return float(extractor.pool_features(extractor.optical_density(view[None]), hue=False)[0, TISSUE_INDEX])


def scaled_views(
    name: str,
    image: np.ndarray,
    stain: int,
    scales: Sequence[float] = (1.0, 0.5, 0.25),
    crop_sizes: Sequence[int] = (96, 128, 256),
    per_axis: int = 2,
    min_tissue: float = 0.25,
    whole_sides: Sequence[int] = (),
) -> tuple[list[ScaledView], int]:
    """Cut one real image into crops at several scales, and optionally resize it whole.

    Args:
        name: the image's name.
        image: ``(H, W, 3)`` uint8.
        stain: its true stain (0 = H&E, 1 = IHC).
        scales: downscale factors (antialiased) applied to the whole image.
        crop_sizes: crop sides in pixels; a crop larger than the scaled image is skipped.
        per_axis: crops per axis, evenly spaced from edge to edge (``per_axis ** 2`` crops per scale and size).
        min_tissue: crops with a smaller tissue fraction are dropped.
        whole_sides: also the whole image resized (antialiased, aspect kept) so that its longer side is each of these
            (views with ``scale`` :data:`WHOLE`); a side not below the image's own longer side is skipped. The
            tissue rule does not apply: a whole image is what a user hands over.

    Returns:
        ``(views, dropped)``: the kept views and the number of crops dropped for lack of tissue.
    """
    full = _to_tensor(image)
    views, dropped = [], 0
    for scale in scales:
        size = (max(1, round(full.shape[-2] * scale)), max(1, round(full.shape[-1] * scale)))
        scaled = full if scale == 1 else F.interpolate(full, size=size, mode="bilinear", antialias=True)
        scaled = scaled[0].clamp(-1.0, 1.0)
        for crop in crop_sizes:
            if crop > min(size):
                continue
            for y in _positions(size[0], crop, per_axis):
                for x in _positions(size[1], crop, per_axis):
                    pixels = scaled[:, y : y + crop, x : x + crop]
                    if tissue_fraction(pixels) < min_tissue:
                        dropped += 1
                        continue
                    views.append(ScaledView(name, float(scale), int(crop), (y, x), pixels, int(stain)))
    longer = max(full.shape[-2:])
    for side in whole_sides:
        if side >= longer:
            continue
        size = (max(1, round(full.shape[-2] * side / longer)), max(1, round(full.shape[-1] * side / longer)))
        pixels = F.interpolate(full, size=size, mode="bilinear", antialias=True)[0].clamp(-1.0, 1.0)
        views.append(ScaledView(name, WHOLE, int(side), (0, 0), pixels, int(stain)))
    return views, dropped


def cell_name(key: tuple[float, int]) -> str:
    """Readable name of a ``(scale, crop size)`` cell: ``"0.5x 128"`` or ``"whole 256"``."""
    scale, crop = key
    return f"whole {crop}" if scale == WHOLE else f"{scale:g}x {crop}"


@dataclass
class ViewScore:
    """Selector results for one (scale, crop size) cell.

    Attributes:
        correct: views called right (argmax).
        total: views scored.
        uncertain: views whose top probability is below the uncertainty threshold.
        worst: lowest probability given to the true stain.
        wrong: ``(source, position, p_true)`` of the views called wrong.
        views: ``(source, p_true)`` of every view scored, in order (for per-source figures and thresholds).
    """

    correct: int = 0
    total: int = 0
    uncertain: int = 0
    worst: float = 1.0
    wrong: list[tuple[str, tuple[int, int], float]] = field(default_factory=list)
    views: list[tuple[str, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """``correct / total`` (NaN without views)."""
        return self.correct / self.total if self.total else float("nan")


@torch.no_grad()
def selector_view_accuracy(
    selector: Callable[[torch.Tensor], torch.Tensor],
    views: Iterable[ScaledView],
    uncertain_below: float = 0.8,
    batch_size: int = 32,
) -> dict[tuple[float, int], ViewScore]:
    """Score a selector on views grouped by (scale, crop size).

    Args:
        selector: ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 2)`` logits (0 = H&E, 1 = IHC), in eval mode.
        views: from :func:`scaled_views`.
        uncertain_below: a view whose top probability is below this counts as uncertain.
        batch_size: views per forward pass (the crops of one cell share a size; whole-image views of several shapes
            go one by one).

    Returns:
        ``{(scale, crop_size): ViewScore}``.
    """
    groups: dict[tuple[float, int], list[ScaledView]] = {}
    for view in views:
        groups.setdefault((view.scale, view.crop_size), []).append(view)
    scores = {}
    for key in sorted(groups, key=lambda k: (k[0] == WHOLE, -k[0], k[1])):
        cell, items = ViewScore(), groups[key]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if len({tuple(v.pixels.shape) for v in chunk}) > 1:  # whole-image views keep each image's aspect
                prob = torch.cat([selector(v.pixels[None]).float().softmax(dim=1) for v in chunk])
            else:
                prob = selector(torch.stack([v.pixels for v in chunk])).float().softmax(dim=1)
            for view, p in zip(chunk, prob):
                p_true = float(p[view.stain])
                cell.total += 1
                cell.correct += int(p_true > 0.5)
                cell.uncertain += int(float(p.max()) < uncertain_below)
                cell.worst = min(cell.worst, p_true)
                cell.views.append((view.source, p_true))
                if p_true <= 0.5:
                    cell.wrong.append((view.source, view.position, p_true))
        scores[key] = cell
    return scores
