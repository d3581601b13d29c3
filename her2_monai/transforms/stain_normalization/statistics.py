"""Colour statistics of stained images: Macenko stain vectors and concentrations, Reinhard LAB moments, histograms.

Macenko (Macenko et al., ISBI 2009), as implemented here with numpy:

1. optical density ``OD = -log((I + 1) / (I0 + 1))`` per RGB channel, where ``I0`` is the glass (background)
   brightness: the 99th percentile of each channel, so grey-backed scans (some BCI patches) are treated fairly;
2. tissue pixels are those whose OD exceeds ``beta`` in every channel;
3. the two leading eigenvectors of the tissue OD covariance span the stain plane; each tissue pixel's angle in that
   plane is taken and the ``alpha`` and ``100 - alpha`` percentile angles give the two stain vectors;
4. the vectors are assigned to stains (hematoxylin + eosin, or hematoxylin + DAB) by their cosine similarity to the
   canonical vectors of :data:`skimage.color.rgb_from_hed`; implausible vectors make the image degenerate;
5. per-pixel stain concentrations are the least-squares solution ``OD = C @ V``, and their 99th percentiles over tissue
   are the "maximum concentrations";
6. normalisation rescales each concentration by ``max_ref / max_src`` and rebuilds the image with the reference stain
   vectors and background. For IHC only hematoxylin is rescaled by default: the DAB amount is the HER2 signal, and
   rescaling it per image would turn a faint (HER2 0/1+) patch into a strongly stained one.

``torchstain`` (PyPI, numpy backend) was checked as an alternative: it installs without torchvision, but fixes the
background at 240, orders vectors for H&E only, fails on blank patches and keeps its statistics in private
attributes, so the few lines above are kept here instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from skimage.color import rgb2lab, rgb_from_hed

from her2_monai.optical_density import BLACK_OFFSET, optical_density

__all__ = [
    "STAINS",
    "DegenerateImageError",
    "degenerate_reason",
    "macenko_stain_matrix",
    "reinhard_statistics",
    "channel_histograms",
]

#: Stain pairs: the two stains a Macenko decomposition separates, by stain type.
STAINS = {"he": ("hematoxylin", "eosin"), "ihc": ("hematoxylin", "dab")}
_CANONICAL = {"he": rgb_from_hed[[0, 1]], "ihc": rgb_from_hed[[0, 2]]}
_MIN_PIXELS = 256  # a 16x16 patch; fewer pixels give no usable colour statistics
_MIN_TISSUE_FRACTION = 0.01
_MIN_COLOUR_STD = 2.0  # in [0, 255] units: below this in every channel the image is one flat colour
_MAX_FIT_PIXELS = 256 * 256  # statistics are estimated on a strided subsample of at most this many pixels
_HISTOGRAM_TOTAL = 2**20  # stored histograms are rescaled to this many pixels per channel


class DegenerateImageError(ValueError):
    """An image has no usable stain statistics (blank, one colour, too small, or implausible stain vectors)."""


def _check_stain(stain: str, where: str = "stain") -> str:
    if stain not in STAINS:
        raise ValueError(f"{where}: unknown stain '{stain}'; expected one of {list(STAINS)}")
    return stain


def _pixels(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(N, 3)`` float64."""
    return image.reshape(-1, 3).astype(np.float64)


def _subsample(pixels: np.ndarray, limit: int = _MAX_FIT_PIXELS) -> np.ndarray:
    step = max(1, int(np.ceil(len(pixels) / limit)))
    return pixels[::step]


def _background(pixels: np.ndarray) -> np.ndarray:
    """Glass brightness per channel: the 99th percentile, kept within ``[100, 255]``."""
    return np.clip(np.percentile(pixels, 99, axis=0), 100.0, 255.0)


def _optical_density(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``-log((I + 1) / (I0 + 1))`` against the glass ``I0``; brighter than glass reads as 0."""
    return optical_density(pixels, background, offset=BLACK_OFFSET, floor=0.0)


def degenerate_reason(image: np.ndarray) -> str | None:
    """Say why an image cannot be stain-normalised, or return ``None`` when it can.

    Args:
        image: ``(H, W, 3)`` RGB in ``[0, 255]``.

    Returns:
        A sentence naming the problem (too few pixels, one flat colour, no tissue), or ``None``.
    """
    height, width = image.shape[:2]
    if height * width < _MIN_PIXELS:
        return f"the image is {height}x{width} pixels, fewer than {_MIN_PIXELS} (16x16) needed for colour statistics"
    pixels = _subsample(_pixels(image))
    std = pixels.std(axis=0)
    if float(std.max()) < _MIN_COLOUR_STD:
        mean = np.round(pixels.mean(axis=0)).astype(int).tolist()
        return f"the image is one flat colour (RGB about {mean}, std < {_MIN_COLOUR_STD}): no stain variation"
    od = _optical_density(pixels, _background(pixels))
    tissue = float((od.sum(axis=1) > 0.15).mean())
    if tissue < _MIN_TISSUE_FRACTION:
        return f"only {tissue:.1%} of the pixels are tissue (blank or background patch)"
    return None


def _macenko_from_od(od: np.ndarray, stain: str, beta: float, alpha: float) -> np.ndarray:
    """Stain vectors ``(2, 3)`` (unit rows, in :data:`STAINS` order) from optical densities ``(N, 3)``."""
    tissue = od[(od > beta).all(axis=1)]
    if len(tissue) < 64:
        raise DegenerateImageError(f"only {len(tissue)} pixels have optical density above beta={beta} in every channel")
    _, eigenvectors = np.linalg.eigh(np.cov(tissue.T))
    plane = eigenvectors[:, [2, 1]]  # the two leading eigenvectors
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point them into the positive OD octant
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100 - alpha])
    vectors = np.stack([plane @ [np.cos(low), np.sin(low)], plane @ [np.cos(high), np.sin(high)]])
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    canonical = _CANONICAL[stain] / np.linalg.norm(_CANONICAL[stain], axis=1, keepdims=True)
    if np.trace(vectors @ canonical.T) < np.trace(vectors[::-1] @ canonical.T):
        vectors = vectors[::-1]
    to_canonical = np.degrees(np.arccos(np.clip((vectors * canonical).sum(axis=1), -1, 1)))
    separation = float(np.degrees(np.arccos(np.clip(vectors[0] @ vectors[1], -1, 1))))
    names = STAINS[stain]
    if separation < 2.0:
        raise DegenerateImageError(f"the two stain vectors are only {separation:.1f} degrees apart (one stain only?)")
    for name, angle in zip(names, to_canonical):
        if angle > 50.0:
            raise DegenerateImageError(f"the {name} vector is {angle:.0f} degrees from any plausible {name} colour")
    return np.ascontiguousarray(vectors)


def _concentrations(od: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations ``(N, 2)`` of optical densities ``(N, 3)`` for stain vectors ``(2, 3)``."""
    return np.linalg.lstsq(vectors.T, od.T, rcond=None)[0].T


def _max_concentrations(od: np.ndarray, vectors: np.ndarray, beta: float) -> np.ndarray:
    tissue = od[(od > beta).all(axis=1)]
    return np.percentile(_concentrations(tissue, vectors), 99, axis=0)


def macenko_stain_matrix(
    image: np.ndarray, stain: str = "he", beta: float = 0.15, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimate the Macenko stain matrix of one image.

    Args:
        image: ``(H, W, 3)`` RGB in ``[0, 255]``.
        stain: ``"he"`` (hematoxylin, eosin) or ``"ihc"`` (hematoxylin, DAB).
        beta: optical density below which a channel counts as background.
        alpha: percentile of the extreme angles taken as the pure stains (robust to outliers).

    Returns:
        ``(vectors, max_concentrations, background)``: unit stain vectors ``(2, 3)`` in :data:`STAINS` order, the 99th
        percentile concentration of each stain ``(2,)`` and the glass brightness per channel ``(3,)``.

    Raises:
        DegenerateImageError: if the image is blank, one colour, too small, or its stain vectors are implausible.
    """
    _check_stain(stain)
    reason = degenerate_reason(image)
    if reason:
        raise DegenerateImageError(reason)
    pixels = _subsample(_pixels(image))
    background = _background(pixels)
    od = _optical_density(pixels, background)
    vectors = _macenko_from_od(od, stain, beta, alpha)
    return vectors, _max_concentrations(od, vectors, beta), background


def reinhard_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation in CIE-LAB (Reinhard et al. 2001).

    Args:
        image: ``(H, W, 3)`` RGB in ``[0, 255]``.

    Returns:
        ``(mean, std)``, each ``(3,)`` for L, a, b.
    """
    lab = rgb2lab(np.clip(image, 0, 255) / 255.0).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def channel_histograms(image: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin histograms of an RGB image rounded to integers.

    Args:
        image: ``(H, W, 3)`` RGB in ``[0, 255]``.

    Returns:
        ``(3, 256)`` int64 counts.
    """
    values = np.clip(np.rint(image), 0, 255).astype(np.uint8).reshape(-1, 3)
    return np.stack([np.bincount(values[:, c], minlength=256) for c in range(3)]).astype(np.int64)


def _rescale_histograms(counts: np.ndarray, total: int = _HISTOGRAM_TOTAL) -> np.ndarray:
    """Scale each row of ``counts`` to sum to ``total`` (largest remainder), keeping every non-empty bin non-empty."""
    out = np.zeros_like(counts, dtype=np.int64)
    for c, row in enumerate(counts.astype(np.float64)):
        scaled = row / row.sum() * total
        whole = np.floor(scaled).astype(np.int64)
        whole[(row > 0) & (whole == 0)] = 1
        missing = total - int(whole.sum())
        if missing > 0:
            whole[np.argsort(whole - scaled)[:missing]] += 1
        out[c] = whole
    return out


def _to_hwc(image: Any) -> np.ndarray:
    """``(3, H, W)`` numpy/torch image -> ``(H, W, 3)`` float64, with shape and value checks."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"stain normalisation expects an RGB image of shape (3, H, W), got shape {tuple(array.shape)}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("stain normalisation got an image containing NaN or infinite values")
    return np.moveaxis(array, 0, -1)
