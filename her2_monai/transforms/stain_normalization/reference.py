"""The stain reference: fitted target statistics of one method for one stain type, and its JSON file format."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.color import rgb2lab

from her2_monai.fileio import write_json_atomic
from her2_monai.transforms.stain_normalization.statistics import (
    _MAX_FIT_PIXELS,
    STAINS,
    DegenerateImageError,
    _background,
    _check_stain,
    _macenko_from_od,
    _max_concentrations,
    _optical_density,
    _pixels,
    _rescale_histograms,
    _subsample,
    _to_hwc,
    channel_histograms,
    degenerate_reason,
    macenko_stain_matrix,
)

__all__ = ["METHODS", "REFERENCE_FORMAT", "REFERENCE_VERSION", "StainReference"]

#: Normalisation methods. ``multitarget`` is Macenko with statistics aggregated over several reference images.
METHODS = ("macenko", "reinhard", "histogram", "multitarget")
REFERENCE_FORMAT = "her2_monai.stain_reference"
REFERENCE_VERSION = 1


def _check_method(method: str, where: str = "method") -> str:
    if method not in METHODS:
        raise ValueError(f"{where}: unknown stain normalisation method '{method}'; expected one of {list(METHODS)}")
    return method


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
