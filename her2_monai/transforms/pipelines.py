"""Ready-made preprocessing pipelines (the bundle configs spell the same chain out with ``_target_`` entries)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRanged,
)

from her2_monai.constants import HE_KEY, IHC_KEY
from her2_monai.transforms.io import LoadStainsd
from her2_monai.transforms.stains import FillMissingStainsd, RandModalityDropoutd, RandStainJitterd

__all__ = ["stain_transforms"]

STAIN_KEYS: tuple[str, str] = (HE_KEY, IHC_KEY)


def stain_transforms(
    image_size: int = 256,
    train: bool = False,
    crop_size: int | None = None,
    modality_dropout: float = 0.0,
    jitter_prob: float = 0.5,
    keys: Sequence[str] = STAIN_KEYS,
) -> Compose:
    """Build the record -> model-input pipeline.

    Output: ``he`` and ``ihc`` ``(3, image_size, image_size)`` float tensors in ``[-1, 1]`` (zeros for a missing stain),
    ``mask`` ``(2,)`` and ``label`` (long, ``-1`` when unlabelled).

    Images are first resized to ``image_size`` (this fixes the magnification the networks see). Training then adds,
    in this order: modality dropout, an optional random crop of ``crop_size`` (one window for both stains; the GAN
    stage uses it, and its fully convolutional generators later run on whole ``image_size`` patches), random flips
    and 90-degree rotations (one draw for both stains, so the pair stays registered) and independent per-stain
    optical-density jitter.

    Args:
        image_size: side length fed to the network.
        train: add the random augmentations.
        crop_size: random-crop side after resizing (training only); ``None`` keeps whole patches.
        modality_dropout: chance of hiding one stain of a dual record (training only).
        jitter_prob: chance of stain jitter per stain (training only).
        keys: stain keys in mask-column order.

    Returns:
        A MONAI ``Compose``.
    """
    keys = list(keys)
    chain: list = [LoadStainsd(keys)]
    chain.append(Resized(keys, spatial_size=(image_size, image_size), mode="area", allow_missing_keys=True))
    # Everything above is deterministic, so a MONAI CacheDataset keeps decoded, resized patches in memory.
    if train:
        if modality_dropout > 0:
            chain.append(RandModalityDropoutd(keys, prob=modality_dropout))
        if crop_size:
            chain.append(RandSpatialCropd(keys, roi_size=crop_size, random_size=False, allow_missing_keys=True))
        chain += [
            RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
            RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
            RandRotate90d(keys, prob=0.5, max_k=3, allow_missing_keys=True),
            RandStainJitterd(keys, prob=jitter_prob),
        ]
    chain += [
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0, clip=True, allow_missing_keys=True),
        FillMissingStainsd(keys),
    ]
    return Compose(chain)
