"""Dictionary transforms for the missing-stain state: filling a missing stain, and hiding one (modality dropout)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from her2_monai.constants import HE_KEY, IHC_KEY, MASK_KEY

__all__ = ["FillMissingStainsd", "RandModalityDropoutd"]


class FillMissingStainsd(MapTransform):
    """Put a zero image in place of every missing stain, shaped like the stains that are present.

    Run it last: every earlier transform then works only on real pixels. The mask (see
    :class:`~her2_monai.transforms.load.LoadStainsd`) already says which stains are real.

    Args:
        keys: stain keys.
        fill_value: value of the placeholder (0 is the middle of the ``[-1, 1]`` model input range).

    Raises:
        ValueError: if no stain is present.
    """

    def __init__(self, keys: Sequence[str] = (HE_KEY, IHC_KEY), fill_value: float = 0.0) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.fill_value = fill_value

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        present = [d[k] for k in self.keys if d.get(k) is not None]
        if not present:
            raise ValueError(f"cannot fill missing stains: none of {list(self.keys)} is present")
        template = torch.as_tensor(present[0])
        for key in self.keys:
            if d.get(key) is None:
                d[key] = torch.full_like(template, self.fill_value)
        return d


class RandModalityDropoutd(RandomizableTransform, MapTransform):
    """With probability ``prob``, hide one stain of a dual record, so every missing-stain scenario is trained.

    Applied after loading and before :class:`FillMissingStainsd`: the dropped stain is removed and its mask column set
    to 0. Records that already miss a stain are left alone.

    Args:
        keys: stain keys in mask-column order.
        prob: chance of dropping a stain from a dual record (the MM'25 recipe uses about 0.2).
        drop_weights: relative chance of dropping each key (default: H&E and IHC equally).
        mask_key: availability mask key.
    """

    def __init__(
        self,
        keys: Sequence[str] = (HE_KEY, IHC_KEY),
        prob: float = 0.2,
        drop_weights: Sequence[float] | None = None,
        mask_key: str = MASK_KEY,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        weights = np.ones(len(self.keys)) if drop_weights is None else np.asarray(drop_weights, dtype=float)
        if weights.shape != (len(self.keys),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"drop_weights must be {len(self.keys)} non-negative numbers, got {drop_weights}")
        self.drop_p = weights / weights.sum()
        self.mask_key = mask_key
        self._drop = 0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self._drop = int(self.R.choice(len(self.keys), p=self.drop_p))

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        self.randomize()
        mask = torch.as_tensor(d[self.mask_key]).clone()
        if not self._do_transform or mask.sum() < len(self.keys):
            return d
        d.pop(self.keys[self._drop], None)
        mask[self._drop] = 0.0
        d[self.mask_key] = mask
        return d
