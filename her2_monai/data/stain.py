"""Stain identity from colour statistics: tells H&E from HER2-IHC (DAB + hematoxylin) without a trained network.

Eosin absorbs green far more than blue, while DAB absorbs blue more than green, so the normalised green-minus-blue
optical density of the tissue pixels ("eosin index") is high for H&E and low for IHC. It is used where an image pair
is known to hold one of each (side-by-side "AB" files): the half with the higher index is the H&E.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["StainStatistics", "stain_statistics", "order_he_ihc"]


@dataclass(frozen=True)
class StainStatistics:
    """Colour statistics of one RGB patch.

    Attributes:
        eosin_index: mean over tissue pixels of ``(OD_green - OD_blue) / OD_total``; H&E > IHC.
        tissue_fraction: fraction of pixels whose optical density marks them as tissue.
        mean_od: mean total optical density over tissue pixels.
    """

    eosin_index: float
    tissue_fraction: float
    mean_od: float


def stain_statistics(rgb: np.ndarray, max_side: int = 256) -> StainStatistics:
    """Compute :class:`StainStatistics` for an RGB uint8 image ``(H, W, 3)``.

    Optical density is taken against the image's own bright background (99th percentile per channel), so labs with
    different illumination compare fairly.

    Args:
        rgb: ``(H, W, 3)`` uint8 image.
        max_side: images are strided down to about this side length first (statistics do not need full resolution).

    Returns:
        The statistics.

    Raises:
        ValueError: if ``rgb`` is not an ``(H, W, 3)`` array.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    step = max(1, max(rgb.shape[:2]) // max_side)
    pixels = rgb[::step, ::step].reshape(-1, 3).astype(np.float64)
    background = np.maximum(np.percentile(pixels, 99, axis=0), 1.0)
    od = -np.log(np.clip((pixels + 1.0) / (background + 1.0), 1e-3, 1.0))
    total = od.sum(axis=1)
    tissue = total > 0.15
    if tissue.sum() < 0.01 * len(total):  # nearly blank patch: use its darkest pixels rather than nothing
        tissue = total >= np.quantile(total, 0.9)
    od_t, total_t = od[tissue], np.maximum(total[tissue], 1e-6)
    return StainStatistics(
        eosin_index=float(((od_t[:, 1] - od_t[:, 2]) / total_t).mean()),
        tissue_fraction=float(tissue.mean()),
        mean_od=float(total_t.mean()),
    )


def order_he_ihc(first: np.ndarray, second: np.ndarray, margin: float = 0.03) -> tuple[bool, float]:
    """Decide which of two images of one registered pair is the H&E.

    Args:
        first: ``(H, W, 3)`` uint8 image.
        second: ``(H, W, 3)`` uint8 image.
        margin: smallest eosin-index difference accepted as a decision.

    Returns:
        ``(first_is_he, difference)`` where ``difference = index(first) - index(second)``.

    Raises:
        ValueError: if the two images are too similar in stain colour to tell apart.
    """
    difference = stain_statistics(first).eosin_index - stain_statistics(second).eosin_index
    if abs(difference) < margin:
        raise ValueError(
            f"cannot tell which half is H&E: eosin indices differ by only {difference:+.4f} (need {margin})"
        )
    return difference > 0, difference
