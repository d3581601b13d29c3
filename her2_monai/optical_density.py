"""Optical density (Beer-Lambert absorbance) of stained images: the one definition the package uses.

A stain absorbs light in proportion to how much of it there is, so stain amounts add up in optical density (OD), not
in RGB. For an intensity ``I`` seen against a white (glass) reference ``W``:

``OD = -ln(clip((I + offset) / (W + offset), floor, 1))``

* ``white`` -- the brightness of empty glass. :data:`WHITE` (255) for images that are white-balanced; a per-image
  or per-channel glass colour where the glass is tinted (ink checks, stain normalisation), so tinted glass reads as
  no absorption.
* ``offset`` -- added to both intensity and white: :data:`BLACK_OFFSET` (1) is the common ``(I + 1) / 256`` form,
  which keeps black finite without a clip; 0 (the default) is the plain ratio.
* ``floor`` -- the smallest transmission, bounding OD at ``-ln(floor)`` (:data:`MIN_TRANSMISSION`, one grey level).

Intensities above white read as OD 0, never as negative absorption. The natural logarithm is used throughout; the
stain vectors of :mod:`her2_monai.stain_features` are in the same units.

The callers chose their ``white``, ``offset`` and ``floor`` before this module existed, and thresholds were tuned on
their results (the input checks), so those stay parameters here rather than being unified into one constant.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["WHITE", "MIN_TRANSMISSION", "BLACK_OFFSET", "optical_density", "intensity_from_optical_density"]

#: Glass brightness of a white-balanced 8-bit image.
WHITE = 255.0
#: Smallest transmission (one grey level of 255): OD is at most ``ln(255) ~ 5.54``.
MIN_TRANSMISSION = 1.0 / 255.0
#: Offset of the ``(I + 1) / (W + 1)`` form, which keeps black finite (``OD <= ln(256)``) without a floor.
BLACK_OFFSET = 1.0

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def optical_density(
    image: ArrayT,
    white: float | np.ndarray | torch.Tensor = WHITE,
    *,
    offset: float = 0.0,
    floor: float = MIN_TRANSMISSION,
) -> ArrayT:
    """Optical density of intensities against a white reference.

    Args:
        image: intensities (any shape; numpy or torch), in the units of ``white`` (``[0, 255]`` or ``[0, 1]``).
            Negative values are read as 0.
        white: glass brightness, broadcast against ``image`` (a scalar, or e.g. ``(3,)`` per channel).
        offset: added to intensity and white before the ratio (:data:`BLACK_OFFSET` for the ``(I + 1) / 256`` form).
        floor: smallest transmission ratio; 0 only with a positive ``offset``.

    Returns:
        Non-negative optical density, same type and shape as ``image`` (float).

    Raises:
        ValueError: when neither ``floor`` nor ``offset`` keeps the logarithm finite.
    """
    if floor <= 0.0 and offset <= 0.0:
        raise ValueError(f"optical density needs a positive floor or offset to stay finite, got {floor=}, {offset=}")
    if isinstance(image, torch.Tensor):
        ratio = (image.clamp_min(0) + offset) / (white + offset) if offset else image.clamp_min(0) / white
        return -torch.log(ratio.clamp(floor, 1.0))
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float64)
    ratio = (np.clip(image, 0, None) + offset) / (white + offset) if offset else np.clip(image, 0, None) / white
    return -np.log(np.clip(ratio, floor, 1.0))


def intensity_from_optical_density(
    od: ArrayT, white: float | np.ndarray | torch.Tensor = WHITE, *, offset: float = 0.0
) -> ArrayT:
    """Invert :func:`optical_density`: ``(W + offset) * exp(-OD) - offset``.

    Not clipped: a negative OD (an augmentation may shift OD below 0) gives an intensity above white; the caller
    clips to its range.

    Args:
        od: optical density (numpy or torch).
        white: glass brightness the OD was taken against.
        offset: the ``offset`` the OD was taken with.

    Returns:
        Intensities, same type and shape as ``od``.
    """
    if isinstance(od, torch.Tensor):
        return torch.exp(-od) * (white + offset) - offset if offset else torch.exp(-od) * white
    return np.exp(-od) * (white + offset) - offset if offset else np.exp(-od) * white
