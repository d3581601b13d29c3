"""Loading a datalist record whose H&E or IHC may be missing."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY, UNLABELLED
from her2_monai.data.image_reader import read_rgb

__all__ = ["LoadStainsd"]


def _checked_array(key: str, value: object) -> np.ndarray:
    """An in-memory image: ``(H, W, 3)``, at least one pixel, real numbers, all finite."""
    image = np.asarray(value)
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"'{key}' must be a file path or an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"'{key}' must hold integer or real pixel values, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"'{key}' holds NaN or infinite pixel values")
    return image


class LoadStainsd(MapTransform):
    """Read the stains named by ``keys`` into ``(3, H, W)`` float32 tensors in ``[0, 255]`` and record availability.

    A key whose value is ``None`` (or absent) is a missing stain: the key is removed from the output, so that MONAI
    transforms with ``allow_missing_keys=True`` skip it, and :class:`~her2_monai.transforms.missing.FillMissingStainsd`
    restores it as zeros at the end of the pipeline. The availability mask (``(len(keys),)`` float, 1 = present) is
    written under ``mask_key``. A ``None`` label becomes ``-1`` so that batches collate.

    Args:
        keys: stain keys, in mask-column order (default ``("he", "ihc")``).
        mask_key: output key of the availability mask.
        label_key: label key (converted to a long scalar tensor when present).

    Raises:
        ValueError: if a record has none of the stains, naming the record, or an in-memory image is not a finite
            ``(H, W, 3)`` array of numbers.
        her2_monai.data.image_reader.ImageReadError: if a file cannot be read (its path and the reason).
    """

    def __init__(
        self,
        keys: Sequence[str] = (HE_KEY, IHC_KEY),
        mask_key: str = MASK_KEY,
        label_key: str = LABEL_KEY,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.mask_key = mask_key
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        present = []
        for key in self.keys:
            value = d.pop(key, None)
            if value is None:
                present.append(0.0)
                continue
            if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
                image = read_rgb(value)  # type: ignore[arg-type]
            else:
                image = _checked_array(key, value)
            d[key] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
            present.append(1.0)
        if not any(present):
            name = d.get("id", "<unnamed record>")
            raise ValueError(f"record '{name}' has none of the stains {list(self.keys)}; at least one is needed")
        d[self.mask_key] = torch.tensor(present, dtype=torch.float32)
        if self.label_key in d or self.label_key in data:
            label = d.get(self.label_key)
            d[self.label_key] = torch.tensor(UNLABELLED if label is None else int(label), dtype=torch.long)
        return d
