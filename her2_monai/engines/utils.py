"""Batch handling and mixed precision shared by the trainers and evaluators."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY

__all__ = ["StainBatch", "prepare_stain_batch", "autocast", "make_grad_scaler"]


class StainBatch(dict):
    """A batch on the device: ``he``, ``ihc`` ``(B, 3, H, W)``, ``mask`` ``(B, 2)`` and, when present, ``label``."""


def prepare_stain_batch(
    batch: Mapping[str, Any], device: torch.device | str, channels_last: bool = False, non_blocking: bool = False
) -> StainBatch:
    """Move the stains, mask and label of a collated batch to ``device``.

    Args:
        batch: output of the MONAI data loader (see :func:`her2_monai.transforms.stain_transforms`).
        device: target device.
        channels_last: store the images in channels-last memory format (faster convolutions on CPU and GPU).
        non_blocking: asynchronous host-to-device copies.

    Returns:
        A :class:`StainBatch` with plain ``torch.Tensor`` values (MetaTensor metadata dropped).

    Raises:
        KeyError: if the batch lacks ``he``, ``ihc`` or ``mask``.
    """
    missing = [k for k in (HE_KEY, IHC_KEY, MASK_KEY) if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected the output of her2_monai.transforms.stain_transforms")
    memory = torch.channels_last if channels_last else torch.contiguous_format
    out = StainBatch()
    for key in (HE_KEY, IHC_KEY):
        image = torch.as_tensor(batch[key]).as_subclass(torch.Tensor)
        out[key] = image.to(device=device, dtype=torch.float32, non_blocking=non_blocking, memory_format=memory)
    out[MASK_KEY] = torch.as_tensor(batch[MASK_KEY]).as_subclass(torch.Tensor).to(device, dtype=torch.float32)
    if LABEL_KEY in batch:
        out[LABEL_KEY] = torch.as_tensor(batch[LABEL_KEY]).as_subclass(torch.Tensor).to(device, dtype=torch.long)
    return out


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for ``device``: float16 on CUDA, bfloat16 on CPU (AMX/AVX-512 run it several times faster)."""
    device_type = torch.device(device).type
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)


def make_grad_scaler(device: torch.device | str, enabled: bool) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for float16 (CUDA) autocast; bfloat16 needs none."""
    use = enabled and torch.device(device).type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=use)
