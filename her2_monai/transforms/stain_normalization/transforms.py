"""The stain normalisation transforms: :class:`NormalizeStain` and its dictionary form :class:`NormalizeStaind`."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from her2_monai.transforms.stain_normalization.normalizers import (
    build_normalizer,
)
from her2_monai.transforms.stain_normalization.reference import (
    StainReference,
)
from her2_monai.transforms.stain_normalization.statistics import (
    DegenerateImageError,
    _to_hwc,
    degenerate_reason,
)

__all__ = ["StainNormalizationWarning", "NormalizeStain", "NormalizeStaind"]


class StainNormalizationWarning(UserWarning):
    """An image was passed through unchanged because its stain statistics cannot be estimated."""


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
        self._normalize = build_normalizer(self.reference, beta, alpha, preserve_dab)

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
