"""Is there stained tissue in the image at all? The check every prediction passes before a HER2 score is given.

Stained tissue is coloured (haematoxylin blue, eosin pink, DAB brown); glass, background and blank or transparent
images are white or grey. :func:`tissue_mask` thresholds the smoothed HSV saturation with Otsu's method
(scikit-image), clamped to a measured range -- the rule a whole-slide tiler uses on a thumbnail. :class:`TissueCheckd`
applies it to each stain of a record, with more refusals: images smaller than ``min_size`` pixels a side, images of
one colour (blank or fully transparent) and greyscale images (equal channels, e.g. a 16-bit greyscale file), which
cannot be stained tissue.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu

from her2_monai.constants import HE_KEY, IHC_KEY

__all__ = ["TISSUE_KEYS", "saturation", "tissue_mask", "tissue_fraction", "TissueCheckd"]

#: Output keys of :class:`TissueCheckd`: per-slot tissue share, 1/0 verdict, and the reason when refused.
TISSUE_KEYS = ("tissue_fraction", "tissue_ok", "tissue_issue")
#: Bounds of the saturation threshold (measured after smoothing: glass tinted (240, 236, 228) with pixel noise has no
#: pixel above 0.06; the palest demo IHC patch 4.6% above 0.08, real BCI/MIST patches >= 10%).
SATURATION_RANGE = (0.06, 0.08)
#: Gaussian smoothing (pixels) of the saturation map before thresholding.
SMOOTHING = 2.0


def _hwc(image: Any) -> np.ndarray:
    """``(H, W, 3)`` float array in ``[0, 255]`` from ``(H, W, 3)`` or ``(3, H, W)`` arrays or tensors."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {array.shape}")
    return array.astype(np.float64)


def saturation(image: Any) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` per pixel, ``(H, W)`` in ``[0, 1]`` (0 for black)."""
    rgb = _hwc(image)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def tissue_mask(
    image: Any, saturation_range: tuple[float, float] = SATURATION_RANGE, sigma: float = SMOOTHING
) -> np.ndarray:
    """Tissue pixels: smoothed saturation above Otsu's threshold, the threshold clamped to ``saturation_range``.

    Otsu's method splits a bimodal histogram (white glass versus stained tissue), as on a slide thumbnail. A patch is
    often nearly all tissue, where Otsu would split the tissue itself (pale haematoxylin-only IHC against stained
    areas), hence the upper bound; the lower bound keeps the JPEG noise and tint of blank glass out.

    Args:
        image: RGB ``(H, W, 3)`` or ``(3, H, W)`` in ``[0, 255]``.
        saturation_range: ``(low, high)`` bounds of the threshold.
        sigma: Gaussian smoothing of the saturation map in pixels (pixel noise of blank glass averages out).

    Returns:
        ``(H, W)`` bool mask.
    """
    low, high = saturation_range
    sat = saturation(image)
    if sigma > 0:
        sat = gaussian_filter(sat, sigma)
    level = low
    if sat.size > 1 and float(sat.max()) > float(sat.min()):
        level = min(max(low, float(threshold_otsu(sat))), high)
    return sat > level


def tissue_fraction(image: Any, saturation_range: tuple[float, float] = SATURATION_RANGE) -> float:
    """Share of tissue pixels of an RGB image (see :func:`tissue_mask`)."""
    return float(tissue_mask(image, saturation_range).mean())


class TissueCheckd(MapTransform):
    """Check each stain image of a record for tissue before it is resized and scored.

    Writes ``tissue_fraction`` (``(len(keys),)`` float, ``-1`` for an absent stain), ``tissue_ok`` (float 1/0: every
    given image passed) and ``tissue_issue`` (``""`` or the reason, naming the stain). Runs after
    :class:`~her2_monai.transforms.load.LoadStainsd` (images ``(3, H, W)`` in ``[0, 255]``, alpha already composited
    on white, so a transparent image is blank) and before any resizing, so ``min_size`` is the original size.

    Args:
        keys: stain keys.
        min_size: smallest accepted side in pixels.
        min_tissue_fraction: smallest accepted share of tissue pixels.
        saturation_range: see :func:`tissue_mask`.

    Raises:
        ValueError: for a non-positive ``min_size`` or a fraction outside ``[0, 1]``.
    """

    def __init__(
        self,
        keys: Sequence[str] = (HE_KEY, IHC_KEY),
        min_size: int = 32,
        min_tissue_fraction: float = 0.02,
        saturation_range: Sequence[float] = SATURATION_RANGE,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if int(min_size) < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        if not 0.0 <= float(min_tissue_fraction) <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
        self.min_size = int(min_size)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))

    def check(self, image: Any) -> tuple[float, str]:
        """``(tissue share, reason)`` of one image; the reason is ``""`` when it passes."""
        rgb = _hwc(image)
        height, width = rgb.shape[:2]
        if min(height, width) < self.min_size:
            return 0.0, f"image is {width}x{height} px, smaller than the {self.min_size} px minimum"
        if np.ptp(rgb.reshape(-1, 3), axis=0).max() == 0:
            return 0.0, "blank image (a single colour, e.g. empty or fully transparent): no stained tissue"
        if np.ptp(rgb, axis=-1).max() == 0:
            return 0.0, "greyscale image (equal colour channels): not a stained RGB patch"
        share = tissue_fraction(rgb, self.saturation_range)
        if share < self.min_tissue_fraction:
            return share, (
                f"no stained tissue: {share:.1%} of the pixels are tissue, at least "
                f"{self.min_tissue_fraction:.0%} needed (blank, background or transparent image)"
            )
        return share, ""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shares, issues = [], []
        for key in self.keys:
            if d.get(key) is None:
                shares.append(-1.0)
                continue
            share, issue = self.check(d[key])
            shares.append(share)
            if issue:
                issues.append(f"{key}: {issue}")
        d["tissue_fraction"] = torch.tensor(shares, dtype=torch.float32)
        d["tissue_ok"] = torch.tensor(0.0 if issues else 1.0)
        d["tissue_issue"] = "; ".join(issues)
        return d
