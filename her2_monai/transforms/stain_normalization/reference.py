"""Stain normalisation of H&E and HER2-IHC patches as MONAI transforms: Macenko, Reinhard, histogram matching and
multi-target Macenko, all mapping an image onto a fitted, saveable :class:`StainReference`.

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

import copy
import json
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type
from skimage.color import lab2rgb, rgb2lab, rgb_from_hed
from skimage.exposure import match_histograms

from her2_monai.fileio import write_json_atomic
from her2_monai.optical_density import BLACK_OFFSET, intensity_from_optical_density, optical_density

__all__ = [
    "METHODS",
    "STAINS",
    "REFERENCE_FORMAT",
    "REFERENCE_VERSION",
    "StainNormalizationWarning",
    "DegenerateImageError",
    "StainReference",
    "NormalizeStain",
    "NormalizeStaind",
    "macenko_stain_matrix",
    "reinhard_statistics",
    "channel_histograms",
    "degenerate_reason",
]

#: Normalisation methods. ``multitarget`` is Macenko with statistics aggregated over several reference images.
METHODS = ("macenko", "reinhard", "histogram", "multitarget")
#: Stain pairs: the two stains a Macenko decomposition separates, by stain type.
STAINS = {"he": ("hematoxylin", "eosin"), "ihc": ("hematoxylin", "dab")}
REFERENCE_FORMAT = "her2_monai.stain_reference"
REFERENCE_VERSION = 1

_CANONICAL = {"he": rgb_from_hed[[0, 1]], "ihc": rgb_from_hed[[0, 2]]}
_MIN_PIXELS = 256  # a 16x16 patch; fewer pixels give no usable colour statistics
_MIN_TISSUE_FRACTION = 0.01
_MIN_COLOUR_STD = 2.0  # in [0, 255] units: below this in every channel the image is one flat colour
_MAX_FIT_PIXELS = 256 * 256  # statistics are estimated on a strided subsample of at most this many pixels
_HISTOGRAM_TOTAL = 2**20  # stored histograms are rescaled to this many pixels per channel


class StainNormalizationWarning(UserWarning):
    """An image was passed through unchanged because its stain statistics cannot be estimated."""


class DegenerateImageError(ValueError):
    """An image has no usable stain statistics (blank, one colour, too small, or implausible stain vectors)."""


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


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


# ----------------------------------------------------------------------------------------------------------------------
# Reference


def _check_method(method: str, where: str = "method") -> str:
    if method not in METHODS:
        raise ValueError(f"{where}: unknown stain normalisation method '{method}'; expected one of {list(METHODS)}")
    return method


def _check_stain(stain: str, where: str = "stain") -> str:
    if stain not in STAINS:
        raise ValueError(f"{where}: unknown stain '{stain}'; expected one of {list(STAINS)}")
    return stain


def _read_reference_image(image: Any) -> np.ndarray:
    """A path, an ``(H, W, 3)`` uint8 array as read from disk, or a ``(3, H, W)`` transform image -> ``(H, W, 3)``."""
    if isinstance(image, (str, os.PathLike)):
        from her2_monai.data.image_reader import read_rgb

        return read_rgb(image).astype(np.float64)
    return _to_hwc(image)


def _image_name(image: Any, index: int) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else f"<array {index}>"


@dataclass
class StainReference:
    """Fitted target statistics of one normalisation method for one stain type, saveable as JSON.

    Attributes:
        method: one of :data:`METHODS`.
        stain: ``"he"`` or ``"ihc"``.
        statistics: method-specific numbers (see ``docs/stain_normalisation.md``).
        images: names of the images the statistics were fitted on.
    """

    method: str
    stain: str
    statistics: dict[str, Any]
    images: list[str] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        images: Sequence[Any],
        method: str = "macenko",
        stain: str = "he",
        beta: float = 0.15,
        alpha: float = 1.0,
        aggregate: str = "median",
    ) -> StainReference:
        """Fit reference statistics on one or more target images.

        ``macenko`` pools the tissue pixels of all images into one decomposition; ``multitarget`` decomposes each
        image on its own and takes the ``aggregate`` (median or mean) of the per-image stain vectors, maximum
        concentrations and backgrounds; ``reinhard`` pools LAB pixels; ``histogram`` sums the channel histograms.

        Args:
            images: image file paths, ``(H, W, 3)`` uint8 arrays, or ``(3, H, W)`` transform images.
            method: one of :data:`METHODS`.
            stain: ``"he"`` or ``"ihc"``.
            beta: Macenko background optical density threshold.
            alpha: Macenko extreme-angle percentile.
            aggregate: ``"median"`` or ``"mean"`` of per-image statistics (``multitarget`` only).

        Returns:
            The fitted reference.

        Raises:
            ValueError: on an unknown method, stain or aggregate, no images, or an image without usable statistics
                (the message names the image).
        """
        _check_method(method)
        _check_stain(stain)
        if aggregate not in ("median", "mean"):
            raise ValueError(f"aggregate: expected 'median' or 'mean', got '{aggregate}'")
        if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
            images = [images]
        if len(images) == 0:
            raise ValueError("cannot fit a stain reference on no images")
        names = [_image_name(image, i) for i, image in enumerate(images)]
        arrays = []
        for name, image in zip(names, images):
            array = _read_reference_image(image)
            reason = degenerate_reason(array)
            if reason:
                raise ValueError(f"reference image {name}: {reason}")
            arrays.append(array)
        try:
            statistics = _FITTERS[method](arrays, stain, beta, alpha, aggregate, names)
        except DegenerateImageError as err:
            raise ValueError(f"reference images {names}: {err}") from None
        return cls(method=method, stain=stain, statistics=statistics, images=names)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (a deep copy): format, version, method, stain, images and statistics."""
        return {
            "format": REFERENCE_FORMAT,
            "version": REFERENCE_VERSION,
            "method": self.method,
            "stain": self.stain,
            "stain_names": list(STAINS[self.stain]),
            "images": list(self.images),
            "statistics": copy.deepcopy(self.statistics),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the reference as JSON, atomically.

        Args:
            path: destination ``.json`` file; its folder is created if needed.

        Returns:
            The written path.
        """
        return write_json_atomic(self.to_dict(), path, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StainReference:
        """Read a reference written by :meth:`save`.

        Args:
            path: a ``.json`` reference file.

        Returns:
            The reference.

        Raises:
            ValueError: if the file is missing, not JSON, of another format or version, or lacks a key (the message
                names the file and the key).
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"stain reference {path}: file not found")
        try:
            document = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"stain reference {path}: not a JSON file ({err})") from None
        return cls.from_dict(document, f"stain reference {path}")

    @classmethod
    def from_dict(cls, document: Any, where: str = "stain reference") -> StainReference:
        """Rebuild a reference from :meth:`to_dict`'s document (a saved file's content or a model file's record).

        Args:
            document: the JSON document.
            where: how to name its origin in messages.

        Returns:
            The reference.

        Raises:
            ValueError: if the document is of another format or version, or lacks a key (naming ``where`` and the key).
        """
        if not isinstance(document, dict) or document.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"{where}: 'format' must be '{REFERENCE_FORMAT}'")
        if document.get("version") != REFERENCE_VERSION:
            raise ValueError(f"{where}: 'version' is {document.get('version')!r}, this code reads {REFERENCE_VERSION}")
        for key in ("method", "stain", "statistics"):
            if key not in document:
                raise ValueError(f"{where}: missing key '{key}'")
        method = _check_method(document["method"], f"{where}: 'method'")
        stain = _check_stain(document["stain"], f"{where}: 'stain'")
        statistics = document["statistics"]
        for key, shape in _STATISTIC_SHAPES[method].items():
            value = statistics.get(key) if isinstance(statistics, dict) else None
            if value is None:
                raise ValueError(f"{where}: missing key 'statistics.{key}' for method '{method}'")
            array = np.asarray(value, dtype=np.float64)
            if array.shape != shape or not np.isfinite(array).all():
                raise ValueError(
                    f"{where}: 'statistics.{key}' must be finite numbers of shape {shape}, got shape {array.shape}"
                )
        return cls(
            method=method, stain=stain, statistics=copy.deepcopy(statistics), images=list(document.get("images", []))
        )

    @classmethod
    def resolve(cls, reference: Any, method: str | None = None, stain: str | None = None) -> StainReference:
        """Turn what a user gave as ``reference`` into a :class:`StainReference`.

        Args:
            reference: a :class:`StainReference`; a ``.json`` file written by :meth:`save`; its document (a dict, as
                a model file records it); or one image (path or array) or a list of them to fit on the fly with
                ``method`` and ``stain``.
            method: required when fitting; must match a given or loaded reference's method when both are set.
            stain: as ``method`` (default ``"he"`` when fitting).

        Returns:
            The reference.

        Raises:
            ValueError: on a method or stain that contradicts the reference, or an unusable reference.
        """
        if isinstance(reference, StainReference):
            resolved, origin = reference, "the given reference"
        elif isinstance(reference, (str, os.PathLike)) and Path(reference).suffix.lower() == ".json":
            resolved, origin = cls.load(reference), f"stain reference {reference}"
        elif isinstance(reference, Mapping):
            resolved, origin = cls.from_dict(dict(reference), "the recorded stain reference"), "the recorded reference"
        else:
            if method is None:
                raise ValueError(f"method is needed to fit a stain reference on images; expected one of {METHODS}")
            images = list(reference) if isinstance(reference, (list, tuple)) else [reference]
            return cls.fit(images, method=method, stain=stain or "he")
        if method is not None and _check_method(method) != resolved.method:
            raise ValueError(f"method '{method}' was asked for, but {origin} is for '{resolved.method}'")
        if stain is not None and _check_stain(stain) != resolved.stain:
            raise ValueError(f"stain '{stain}' was asked for, but {origin} is for '{resolved.stain}'")
        return resolved


def _fit_macenko(arrays, stain, beta, alpha, aggregate, names) -> dict[str, Any]:
    pixels = [_subsample(_pixels(a), _MAX_FIT_PIXELS // len(arrays) + 1) for a in arrays]
    backgrounds = [_background(p) for p in pixels]
    od = np.concatenate([_optical_density(p, b) for p, b in zip(pixels, backgrounds)])
    vectors = _macenko_from_od(od, stain, beta, alpha)
    return {
        "stain_vectors": vectors.tolist(),
        "max_concentrations": _max_concentrations(od, vectors, beta).tolist(),
        "background": np.median(backgrounds, axis=0).tolist(),
        "beta": beta,
        "alpha": alpha,
    }


def _fit_multitarget(arrays, stain, beta, alpha, aggregate, names) -> dict[str, Any]:
    per_image = []
    for name, array in zip(names, arrays):
        try:
            per_image.append(macenko_stain_matrix(array, stain, beta, alpha))
        except DegenerateImageError as err:
            raise DegenerateImageError(f"{name}: {err}") from None
    combine = np.median if aggregate == "median" else np.mean
    vectors = combine([v for v, _, _ in per_image], axis=0)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return {
        "stain_vectors": vectors.tolist(),
        "max_concentrations": combine([c for _, c, _ in per_image], axis=0).tolist(),
        "background": combine([b for _, _, b in per_image], axis=0).tolist(),
        "beta": beta,
        "alpha": alpha,
        "aggregate": aggregate,
        "per_image": [
            {"image": name, "stain_vectors": v.tolist(), "max_concentrations": c.tolist(), "background": b.tolist()}
            for name, (v, c, b) in zip(names, per_image)
        ],
    }


def _fit_reinhard(arrays, stain, beta, alpha, aggregate, names) -> dict[str, Any]:
    lab = np.concatenate(
        [rgb2lab(_subsample(_pixels(a), _MAX_FIT_PIXELS).reshape(-1, 1, 3) / 255.0).reshape(-1, 3) for a in arrays]
    )
    return {"lab_mean": lab.mean(axis=0).tolist(), "lab_std": lab.std(axis=0).tolist()}


def _fit_histogram(arrays, stain, beta, alpha, aggregate, names) -> dict[str, Any]:
    counts = sum(channel_histograms(a) for a in arrays)
    return {"histograms": _rescale_histograms(counts).tolist()}


_FITTERS = {
    "macenko": _fit_macenko,
    "multitarget": _fit_multitarget,
    "reinhard": _fit_reinhard,
    "histogram": _fit_histogram,
}
_MACENKO_SHAPES = {"stain_vectors": (2, 3), "max_concentrations": (2,), "background": (3,)}
_STATISTIC_SHAPES = {
    "macenko": _MACENKO_SHAPES,
    "multitarget": _MACENKO_SHAPES,
    "reinhard": {"lab_mean": (3,), "lab_std": (3,)},
    "histogram": {"histograms": (3, 256)},
}


# ----------------------------------------------------------------------------------------------------------------------
# Normalisers: (H, W, 3) float64 in [0, 255] -> same; raise DegenerateImageError to pass the image through.


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


# ----------------------------------------------------------------------------------------------------------------------
# Transforms


def _to_hwc(image: Any) -> np.ndarray:
    """``(3, H, W)`` numpy/torch image -> ``(H, W, 3)`` float64, with shape and value checks."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"stain normalisation expects an RGB image of shape (3, H, W), got shape {tuple(array.shape)}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("stain normalisation got an image containing NaN or infinite values")
    return np.moveaxis(array, 0, -1)


class NormalizeStain(Transform):
    """Normalise the stain appearance of an RGB image to a reference.

    Input and output are ``(3, H, W)`` images in ``[0, 255]`` (numpy or torch; the output has the input's type, dtype
    and device). Images whose stain statistics cannot be estimated (blank, white, black, one colour, smaller than
    16x16, implausible stain vectors) are returned unchanged with a :class:`StainNormalizationWarning` saying why.

    Args:
        reference: a :class:`StainReference`, a ``.json`` reference file, or an image path (or list of paths) to fit
            on the fly.
        method: one of :data:`METHODS`; needed when fitting, checked against a given reference otherwise.
        stain: ``"he"`` or ``"ihc"``; as ``method``.
        beta: Macenko background optical density threshold.
        alpha: Macenko extreme-angle percentile.
        preserve_dab: for IHC with Macenko/multitarget, keep each pixel's DAB amount (only re-colour it) instead of
            rescaling it to the reference's maximum; the DAB amount is the HER2 signal.

    Raises:
        ValueError: on an unusable reference or option (naming the file or option), or an input of the wrong shape.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        reference: Any,
        method: str | None = None,
        stain: str | None = None,
        beta: float = 0.15,
        alpha: float = 1.0,
        preserve_dab: bool = True,
    ) -> None:
        self.reference = StainReference.resolve(reference, method=method, stain=stain)
        if self.reference.method in ("macenko", "multitarget"):
            rescale = (True, not (self.reference.stain == "ihc" and preserve_dab))
            self._normalize = _MacenkoNormalizer(self.reference, beta, alpha, rescale)
        elif self.reference.method == "reinhard":
            self._normalize = _ReinhardNormalizer(self.reference)
        else:
            self._normalize = _HistogramNormalizer(self.reference)

    @property
    def method(self) -> str:
        """The normalisation method of the reference."""
        return self.reference.method

    def __call__(self, img: Any) -> Any:
        """Normalise one image.

        Args:
            img: ``(3, H, W)`` RGB in ``[0, 255]``, numpy array or torch tensor.

        Returns:
            The normalised image, same shape, type, dtype and device as ``img``, values in ``[0, 255]``.
        """
        image = _to_hwc(img)
        reason = degenerate_reason(image)
        if reason is None:
            try:
                out = self._normalize(image)
            except (DegenerateImageError, np.linalg.LinAlgError) as err:
                reason = str(err)
        if reason is not None:
            warnings.warn(
                f"stain normalisation ({self.method}) skipped, image returned unchanged: {reason}",
                StainNormalizationWarning,
                stacklevel=2,
            )
            return img
        out = np.clip(np.nan_to_num(out, nan=255.0, posinf=255.0, neginf=0.0), 0.0, 255.0)
        out = np.moveaxis(out, -1, 0)
        if isinstance(img, np.ndarray) and np.issubdtype(img.dtype, np.integer):
            out = np.rint(out)
        return convert_to_dst_type(np.ascontiguousarray(out), dst=img)[0]


class NormalizeStaind(MapTransform):
    """Dictionary wrapper of :class:`NormalizeStain`.

    One instance holds one reference, so H&E and IHC keys take one instance each (an H&E reference must not be
    applied to an IHC image). A missing key, or a key whose value is ``None`` (missing stain), is skipped.

    Args:
        keys: keys of the ``(3, H, W)`` images to normalise.
        reference: see :class:`NormalizeStain`.
        method: see :class:`NormalizeStain`.
        stain: see :class:`NormalizeStain`.
        allow_missing_keys: skip keys that are absent (default ``True``: a stain may be missing in a record).
        known_key: when set, a record whose value under this key is 0 is passed through untouched. The inference
            chain sets it to ``stain_known``: an image of unknown stain sits in the H&E slot until the branch selector
            routes it, and must not be normalised as H&E before anyone knows it is one.
        kwargs: further :class:`NormalizeStain` arguments.
    """

    backend = NormalizeStain.backend

    def __init__(
        self,
        keys: KeysCollection,
        reference: Any,
        method: str | None = None,
        stain: str | None = None,
        allow_missing_keys: bool = True,
        known_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeStain(reference, method=method, stain=stain, **kwargs)
        self.known_key = known_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.known_key is not None and float(d.get(self.known_key, 1.0)) < 0.5:
            return d
        for key in self.key_iterator(d):
            if d[key] is not None:
                d[key] = self.normalizer(d[key])
        return d
