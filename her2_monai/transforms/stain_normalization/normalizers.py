"""Normalisers: map an ``(H, W, 3)`` float64 image in ``[0, 255]`` onto a reference; :class:`DegenerateImageError`
when its statistics cannot be estimated (the transform then passes the image through)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from skimage.color import lab2rgb, rgb2lab
from skimage.exposure import match_histograms

from her2_monai.optical_density import BLACK_OFFSET, intensity_from_optical_density
from her2_monai.transforms.stain_normalization.reference import (
    StainReference,
)
from her2_monai.transforms.stain_normalization.statistics import (
    _concentrations,
    _optical_density,
    _pixels,
    macenko_stain_matrix,
)

__all__ = ["build_normalizer"]


class _MacenkoNormalizer:
    """Re-express an image's Macenko concentrations with the reference stain vectors and maximum concentrations."""

    def __init__(self, reference: StainReference, beta: float, alpha: float, rescale: Sequence[bool]) -> None:
        stats = reference.statistics
        self.stain = reference.stain
        self.vectors = np.asarray(stats["stain_vectors"], dtype=np.float64)
        self.max_concentrations = np.asarray(stats["max_concentrations"], dtype=np.float64)
        self.background = np.asarray(stats["background"], dtype=np.float64)
        self.beta, self.alpha, self.rescale = beta, alpha, np.asarray(rescale, dtype=bool)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        vectors, max_src, background = macenko_stain_matrix(image, self.stain, self.beta, self.alpha)
        od = _optical_density(_pixels(image), background)
        concentrations = _concentrations(od, vectors)
        # A stain hardly present in the source (e.g. eosin-poor patch) keeps its amount rather than being blown up.
        scale = np.where(self.rescale & (max_src > 0.05), self.max_concentrations / np.maximum(max_src, 1e-6), 1.0)
        od_out = (concentrations * scale) @ self.vectors
        rgb = intensity_from_optical_density(od_out, self.background, offset=BLACK_OFFSET)
        return rgb.reshape(image.shape)


class _ReinhardNormalizer:
    """Match the per-channel LAB mean and standard deviation to the reference's."""

    def __init__(self, reference: StainReference) -> None:
        self.mean = np.asarray(reference.statistics["lab_mean"], dtype=np.float64)
        self.std = np.asarray(reference.statistics["lab_std"], dtype=np.float64)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        lab = rgb2lab(np.clip(image, 0, 255) / 255.0)
        mean, std = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0)
        # A channel with (almost) no spread in the source is only shifted: scaling it would amplify noise.
        scale = np.where(std > 0.5, self.std / np.maximum(std, 1e-6), 1.0)
        lab = (lab - mean) * scale + self.mean
        lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out-of-gamut colours are clipped by lab2rgb, which says so each time
            return lab2rgb(lab) * 255.0


class _HistogramNormalizer:
    """Match each RGB channel's histogram to the reference's (:func:`skimage.exposure.match_histograms`)."""

    def __init__(self, reference: StainReference) -> None:
        counts = np.asarray(reference.statistics["histograms"], dtype=np.int64)
        # match_histograms on uint8 uses only the template's value counts, so a template rebuilt from the stored
        # histogram gives exactly what the original reference images would.
        columns = [np.repeat(np.arange(256, dtype=np.uint8), counts[c]) for c in range(3)]
        self.template = np.stack(columns, axis=-1)[:, None, :]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        source = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return match_histograms(source, self.template, channel_axis=-1).astype(np.float64)


def build_normalizer(
    reference: StainReference, beta: float, alpha: float, preserve_dab: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """The normaliser of a reference's method.

    Args:
        reference: the fitted reference.
        beta: Macenko background optical density threshold.
        alpha: Macenko extreme-angle percentile.
        preserve_dab: for IHC with Macenko/multitarget, keep each pixel's DAB amount instead of rescaling it.

    Returns:
        ``(H, W, 3)`` float64 in ``[0, 255]`` -> the same; raises :class:`DegenerateImageError` when it cannot.
    """
    if reference.method in ("macenko", "multitarget"):
        return _MacenkoNormalizer(reference, beta, alpha, (True, not (reference.stain == "ihc" and preserve_dab)))
    if reference.method == "reinhard":
        return _ReinhardNormalizer(reference)
    return _HistogramNormalizer(reference)
