"""Stain-robust grey channels of RGB histology images, and alignment quality measures on them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.metrics import normalized_mutual_information

from her2_monai.optical_density import BLACK_OFFSET, optical_density

__all__ = ["CHANNELS", "fill_mask", "registration_channel", "normalized_cross_correlation", "mutual_information"]

#: Channels an H&E and an IHC section have in common, best first for consecutive sections of different stains.
CHANNELS = ("tissue", "od", "hematoxylin", "grey")

#: A fill pixel is at least this bright (white) or at most ``255 -`` it dark (black) in every channel ...
_FILL_LEVEL = 250
#: ... and its 5x5 neighbourhood's mean intensity varies by at most this much (fill is flat; scanned glass is noisy).
_FILL_FLATNESS = 2.0


def fill_mask(rgb: np.ndarray, margin: int = 2) -> np.ndarray:
    """Where an image holds padding rather than a scan: white or black regions that touch the image border and are
    perfectly flat somewhere.

    Such a fill is left around a rotated or shifted scan (or a displaced copy of one). Its straight edge against the
    tissue is not anatomy: read as glass, it would give a registration a strong false edge to align. Scanned glass
    is left alone: it is noisy and, in the real BCI / MIST images, below the fill level (under 0.2% of their pixels
    reach it). A scanner that clips glass to pure white makes that glass fill too; it then drops out of the
    registration, which still aligns the tissue.

    Args:
        rgb: ``(H, W, 3)`` RGB image, uint8 or float in ``[0, 255]``.
        margin: pixels the fill is grown by, to cover the interpolated strip between fill and scan.

    Returns:
        ``(H, W)`` bool, True on fill.
    """
    image = np.asarray(rgb, dtype=np.float32)
    grey = image.mean(axis=-1)
    candidate = (image.min(axis=-1) >= _FILL_LEVEL) | (image.max(axis=-1) <= 255 - _FILL_LEVEL)
    flat = ndimage.maximum_filter(grey, 5) - ndimage.minimum_filter(grey, 5) <= _FILL_FLATNESS
    labels, _ = ndimage.label(candidate)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    # a bright or dark region touching the border that is flat somewhere (not just saturated glass at the edge)
    keep = np.intersect1d(border[border > 0], np.unique(labels[candidate & flat]))
    fill = np.isin(labels, keep)
    return ndimage.binary_dilation(fill, iterations=margin) if margin > 0 and fill.any() else fill


def registration_channel(rgb: np.ndarray, channel: str = "tissue", sigma: float = 1.0) -> np.ndarray:
    """One grey image of an RGB patch on which an H&E and an IHC of neighbouring sections look alike.

    - ``tissue``: mean optical density divided by its Otsu threshold and squashed with ``tanh``, so stroma and
      epithelium (pink/purple in H&E, pale blue/brown in IHC) both read as tissue and lumens, fat and glass as
      background: the architecture two stains share. Best on the real BCI/MIST pairs (see ``docs/registration.md``).
    - ``od``: mean optical density ``-log((I + 1) / 256)``.
    - ``hematoxylin``: the hematoxylin channel of :func:`skimage.color.rgb2hed` (nuclei; both stains have it).
    - ``grey``: inverted mean intensity in ``[0, 1]``.

    Glass is (close to) 0 in every channel, so a white fill outside an image is background too.

    Args:
        rgb: ``(H, W, 3)`` RGB image, uint8 or float in ``[0, 255]``.
        channel: one of :data:`CHANNELS`.
        sigma: Gaussian smoothing in pixels (0 for none).

    Returns:
        ``(H, W)`` float32 image.

    Raises:
        ValueError: on an unknown channel or an image that is not ``(H, W, 3)``.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    image = np.clip(np.asarray(rgb, dtype=np.float64), 0, 255)
    if channel in ("tissue", "od"):
        out = optical_density(image.mean(axis=-1), offset=BLACK_OFFSET, floor=0.0)
        if channel == "tissue":
            # Otsu on the non-white pixels: glass-white fill (e.g. around a rotated image) must not set the threshold
            inked = out[out > 0.02]
            threshold = threshold_otsu(inked) if inked.size > 16 and np.ptp(inked) > 1e-6 else 1.0
            out = np.tanh(out / max(threshold, 1e-3))
    elif channel == "hematoxylin":
        out = np.maximum(rgb2hed(image / 255.0)[..., 0], 0.0)
    elif channel == "grey":
        out = 1.0 - image.mean(axis=-1) / 255.0
    else:
        raise ValueError(f"unknown registration channel '{channel}'; expected one of {list(CHANNELS)}")
    if sigma > 0:
        out = ndimage.gaussian_filter(out, sigma)
    return out.astype(np.float32)


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two images' values (over ``mask`` when given); 1 = identical up to gain and offset.

    Args:
        a: ``(H, W)`` image.
        b: ``(H, W)`` image.
        mask: ``(H, W)`` boolean region to compare (e.g. where both images have data).

    Returns:
        NCC in ``[-1, 1]`` (0 when either image is flat).
    """
    x, y = (a[mask], b[mask]) if mask is not None else (a.ravel(), b.ravel())
    x = x.astype(np.float64) - x.mean()
    y = y.astype(np.float64) - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 32) -> float:
    """Normalised mutual information (Studholme), :func:`skimage.metrics.normalized_mutual_information`.

    Args:
        a: ``(H, W)`` image.
        b: ``(H, W)`` image.
        mask: ``(H, W)`` boolean region to compare.
        bins: joint-histogram bins per axis.

    Returns:
        NMI in ``[1, 2]``: 1 = independent, 2 = one image determines the other.
    """
    x, y = (a[mask], b[mask]) if mask is not None else (a.ravel(), b.ravel())
    return float(normalized_mutual_information(x, y, bins=bins))
