"""Stain-level dictionary transforms: missing-stain filling, modality dropout and per-stain colour jitter."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from her2_monai.constants import HE_KEY, IHC_KEY, MASK_KEY

__all__ = ["FillMissingStainsd", "RandModalityDropoutd", "RandStainJitterd"]


class FillMissingStainsd(MapTransform):
    """Put a zero image in place of every missing stain, shaped like the stains that are present.

    Run it last: every earlier transform then works only on real pixels. The mask (see
    :class:`~her2_monai.transforms.io.LoadStainsd`) already says which stains are real.

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
        prob: chance of dropping a stain from a dual record (SPEC: about 0.2).
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


class RandStainJitterd(RandomizableTransform, MapTransform):
    """Independent random stain-strength jitter for each stain, in optical-density space.

    Each present key is perturbed on its own draw (H&E and IHC come from different slides and staining runs): the
    optical density ``OD = -log((I + 1) / 256)`` of every RGB channel is scaled by ``U(1 - scale, 1 + scale)`` and
    shifted by ``U(-shift, shift)``. Scaling OD (rather than intensity) keeps glass white and changes the stain, the way
    staining time and reagent batches do.

    Args:
        keys: stain keys; images ``(3, H, W)`` in ``[0, 255]``.
        prob: chance of jittering each stain.
        scale: half-width of the per-channel OD multiplier.
        shift: half-width of the per-channel OD offset.
    """

    def __init__(
        self, keys: Sequence[str] = (HE_KEY, IHC_KEY), prob: float = 0.5, scale: float = 0.1, shift: float = 0.03
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.scale = scale
        self.shift = shift

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            super().randomize(None)
            if not self._do_transform:
                continue
            image = torch.as_tensor(d[key], dtype=torch.float32)
            channels = image.shape[0]
            alpha = torch.as_tensor(self.R.uniform(1 - self.scale, 1 + self.scale, channels), dtype=torch.float32)
            beta = torch.as_tensor(self.R.uniform(-self.shift, self.shift, channels), dtype=torch.float32)
            view = (channels,) + (1,) * (image.ndim - 1)
            od = -torch.log((image.clamp(0, 255) + 1.0) / 256.0)
            od = od * alpha.view(view) + beta.view(view)
            d[key] = (torch.exp(-od.clamp_min(0)) * 256.0 - 1.0).clamp(0, 255)
        return d
