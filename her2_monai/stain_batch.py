"""The stain-batch contract: how a batch says which stains each sample has, and the rules built on that.

A batch holds ``he`` and ``ihc`` image tensors ``(B, C, H, W)`` in ``[-1, 1]`` (zeros where a stain is missing) and an
availability ``mask`` ``(B, 2)`` of 0/1 values: column 0 is H&E, column 1 is IHC, and every sample has at least one
stain. From the mask follows the sample's **scenario** (``dual``, ``he_only``, ``ihc_only``). An image whose stain is
not declared sits in the H&E slot until the branch selector assigns it (:func:`assign_unknown_stains`).

Every part of the package (networks, engines, inference, the selector) takes these rules from here, so they are
written once: mask validation, scenario ids, routing of unknown stains, simulated scenarios for evaluation, moving a
collated batch to the device, and device-appropriate mixed precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from her2_monai.constants import DUAL, HE_KEY, HE_ONLY, IHC_KEY, IHC_ONLY, LABEL_KEY, MASK_KEY, SCENARIOS

__all__ = [
    "scenario_id",
    "scenario_ids",
    "check_mask",
    "check_stain_inputs",
    "assign_unknown_stains",
    "route_unknown_stains",
    "simulate_scenario",
    "scenario_inputs",
    "apply_to_present",
    "StainBatch",
    "prepare_stain_batch",
    "autocast",
]

#: Scenario id indexed by ``[he_present][ihc_present]``; ``-1`` marks the invalid "no stain" case.
_SCENARIO_TABLE = ((-1, IHC_ONLY), (HE_ONLY, DUAL))
_MASK_SHAPE = "a (B, 2) tensor (column 0 = H&E, column 1 = IHC available)"


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def scenario_id(he_present: bool, ihc_present: bool) -> int:
    """Scenario id of one sample from which stains it has.

    Args:
        he_present: an H&E image is available.
        ihc_present: an IHC image is available.

    Returns:
        ``DUAL`` (0), ``HE_ONLY`` (1) or ``IHC_ONLY`` (2); ``SCENARIOS[id]`` is its name.

    Raises:
        ValueError: if neither stain is present.
    """
    value = _SCENARIO_TABLE[bool(he_present)][bool(ihc_present)]
    if value < 0:
        raise ValueError("a sample needs at least one stain (H&E or IHC); both are missing")
    return value


def scenario_ids(available: Tensor) -> Tensor:
    """Scenario id per sample of a batch (traceable: no data-dependent Python branches).

    Args:
        available: ``(B, 2)`` availability, bool or 0/1 (rows assumed valid, see :func:`check_mask`).

    Returns:
        ``(B,)`` long: ``DUAL``, ``HE_ONLY`` or ``IHC_ONLY``.
    """
    table = torch.tensor(_SCENARIO_TABLE, dtype=torch.long, device=available.device)
    present = (available > 0.5) if available.is_floating_point() else available.bool()
    return table[present[:, 0].long(), present[:, 1].long()]


def check_mask(mask: Any) -> Tensor:
    """Validate an availability mask and return it as bool.

    Value checks are skipped while tracing (they cannot be part of a traced graph); the shape check always runs.

    Args:
        mask: ``(B, 2)`` tensor of 0/1 values.

    Returns:
        ``(B, 2)`` bool availability.

    Raises:
        ValueError: for a wrong shape, values other than 0/1, or a sample with neither stain (naming the samples).
    """
    if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[1] != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be {_MASK_SHAPE}, got {shape}")
    if not _tracing():
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 (missing) and 1 (available)")
        empty = (~(mask > 0).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"every sample needs at least one stain; samples {empty} have neither H&E nor IHC")
    return mask > 0.5


def _check_image(name: str, image: Any, batch: int, channels: int) -> None:
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a (B, {channels}, H, W) tensor in [-1, 1], got {shape}")
    if image.shape[1] != channels:
        raise ValueError(
            f"{name} must have shape (B, {channels}, H, W) with {channels} RGB channels in [-1, 1], "
            f"got {tuple(image.shape)}"
        )
    if image.shape[0] != batch:
        raise ValueError(f"batch size mismatch: {name} has {image.shape[0]} samples, the mask has {batch} rows")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got {image.dtype}")


def check_stain_inputs(
    he: Tensor | None, ihc: Tensor | None, mask: Tensor, channels: int = 3
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a classifier batch and fill a stain that no sample has (``None``) with zeros.

    Args:
        he: ``(B, C, H, W)`` H&E in ``[-1, 1]`` (zeros where missing), or ``None`` if no sample has H&E.
        ihc: ``(B, C, H, W)`` IHC in ``[-1, 1]``, or ``None``.
        mask: ``(B, 2)`` availability.
        channels: ``C``, channels per stain image.

    Returns:
        ``(he, ihc, available)``: both images as tensors and the ``(B, 2)`` bool availability.

    Raises:
        ValueError: on a bad mask, wrong shapes or dtypes, mismatched batch sizes, images of different shapes, or a
            stain marked available but passed as ``None``.
    """
    available = check_mask(mask)
    if he is None and ihc is None:
        raise ValueError("at least one of he / ihc must be a tensor")
    batch = mask.shape[0]
    for name, image, column in ((HE_KEY, he, 0), (IHC_KEY, ihc, 1)):
        if image is None:
            if not _tracing() and bool(available[:, column].any()):
                raise ValueError(f"{name} is None but the mask marks {name} available for some samples")
            continue
        _check_image(name, image, batch, channels)
    if he is not None and ihc is not None and he.shape != ihc.shape:
        raise ValueError(f"he and ihc must have the same shape, got {tuple(he.shape)} and {tuple(ihc.shape)}")
    he = he if he is not None else torch.zeros_like(ihc)
    ihc = ihc if ihc is not None else torch.zeros_like(he)
    return he, ihc, available


def assign_unknown_stains(
    he: Tensor, ihc: Tensor, mask: Tensor, unknown: Tensor, is_ihc: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Move each unknown-stain image to the slot the branch selector chose (traceable).

    An image of unknown stain arrives in the H&E slot (mask ``[1, 0]``). Where the selector calls it IHC it moves to
    the IHC slot and the mask becomes ``[0, 1]``; samples with declared stains are left exactly as they are.

    Args:
        he: ``(B, C, H, W)``.
        ihc: ``(B, C, H, W)``.
        mask: ``(B, 2)`` availability as given.
        unknown: ``(B,)`` bool, the sample's image is of unknown stain.
        is_ihc: ``(B,)`` bool, the selector's call for the image in the H&E slot.

    Returns:
        ``(he, ihc, mask)`` with the unknown-stain images routed.
    """
    to_ihc = (unknown & is_ihc)[:, None, None, None]
    routed_ihc = torch.where(to_ihc, he, ihc)
    routed_he = torch.where(to_ihc, torch.zeros_like(he), he)
    ihc_row = torch.tensor([0.0, 1.0], dtype=mask.dtype, device=mask.device).expand_as(mask)
    routed_mask = torch.where(to_ihc[:, :, 0, 0], ihc_row, mask)
    return routed_he, routed_ihc, routed_mask


def route_unknown_stains(x: Tensor, is_ihc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Single images of unknown stain -> a classifier batch, each image in the slot the selector chose.

    Args:
        x: ``(B, C, H, W)`` images in ``[-1, 1]``, one per sample.
        is_ihc: ``(B,)`` bool (or 0/1) selector calls, true = IHC.

    Returns:
        ``(he, ihc, mask)``: ``x`` in the H&E or the IHC slot, zeros in the other, and a ``(B, 2)`` mask with one 1
        per row.

    Raises:
        ValueError: if ``is_ihc`` does not hold one 0/1 value per image.
    """
    is_ihc = torch.as_tensor(is_ihc, device=x.device).reshape(-1)
    if not _tracing():
        if is_ihc.numel() != x.shape[0]:
            raise ValueError(f"is_ihc must have one entry per image ({x.shape[0]}), got {is_ihc.numel()}")
        if not bool(((is_ihc == 0) | (is_ihc == 1)).all()):
            raise ValueError("is_ihc must hold 0 (H&E) or 1 (IHC)")
    he_row = torch.tensor([[1.0, 0.0]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2)
    unknown = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return assign_unknown_stains(x, torch.zeros_like(x), he_row, unknown, is_ihc.bool())


def simulate_scenario(mask: Tensor, scenario: str) -> tuple[Tensor, Tensor]:
    """Which samples can be evaluated in ``scenario``, and the availability mask that simulates it for them.

    ``dual`` needs both stains; ``he_only`` hides the IHC of every sample that has an H&E; ``ihc_only`` hides the H&E
    of every sample that has an IHC.

    Args:
        mask: real availability ``(B, 2)``.
        scenario: one of :data:`~her2_monai.constants.SCENARIOS`.

    Returns:
        ``(selected, simulated_mask)``: ``(B,)`` bool and ``(N, 2)`` float for the ``N`` selected samples.

    Raises:
        ValueError: for an unknown scenario.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario '{scenario}'; expected one of {SCENARIOS}")
    has = mask > 0.5
    keep = {"dual": (1.0, 1.0), "he_only": (1.0, 0.0), "ihc_only": (0.0, 1.0)}[scenario]
    needed = torch.tensor(keep, device=mask.device) > 0
    selected = (has | ~needed).all(dim=1)
    n = int(selected.sum())
    return selected, torch.tensor(keep, device=mask.device).expand(n, 2).contiguous()


def scenario_inputs(
    he: Tensor, ihc: Tensor, mask: Tensor, scenario: str, keep: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The inputs that simulate ``scenario`` for the samples that allow it (evaluation and calibration).

    The hidden stain is zeroed exactly as a missing stain is at inference, so the model fills it (CM-GAN synthesis or
    feature substitution) as it would in the clinic.

    Args:
        he: ``(B, C, H, W)``.
        ihc: ``(B, C, H, W)``.
        mask: real availability ``(B, 2)``.
        scenario: one of :data:`~her2_monai.constants.SCENARIOS`.
        keep: optional ``(B,)`` bool further restricting the samples (e.g. the labelled ones).

    Returns:
        ``(selected, he, ihc, mask)``: ``(B,)`` bool, then the ``N`` selected samples' images and simulated mask.

    Raises:
        ValueError: for an unknown scenario.
    """
    selected, _ = simulate_scenario(mask, scenario)
    if keep is not None:
        selected = selected & keep
    _, simulated = simulate_scenario(mask[selected], scenario)
    he_s = he[selected] * simulated[:, 0, None, None, None].to(he.dtype)
    ihc_s = ihc[selected] * simulated[:, 1, None, None, None].to(ihc.dtype)
    return selected, he_s, ihc_s, simulated


def apply_to_present(
    fn: Callable[..., Tensor | tuple[Tensor, ...]], present: Tensor, fills: Sequence[Tensor], *inputs: Tensor
) -> tuple[Tensor, ...]:
    """Run ``fn`` only on the samples where a stain is present; the others get fill values.

    The single-stain branches of the alternative classifiers (a stain's expert or encoder) must not see a missing
    stain's placeholder image; running them on the present samples alone also saves the work.

    Args:
        fn: maps the present samples' ``inputs`` (each indexed along dim 0) to one tensor or a tuple of tensors.
        present: ``(B,)`` bool.
        fills: one ``(B, ...)`` tensor per output of ``fn``, holding the value of samples without the stain.
        inputs: ``(B, ...)`` tensors given to ``fn``.

    Returns:
        One ``(B, ...)`` tensor per output: ``fn``'s values where present, the fill elsewhere.
    """
    if bool(present.all()):
        out = fn(*inputs)
        return out if isinstance(out, tuple) else (out,)
    if not bool(present.any()):
        return tuple(fills)
    index = present.nonzero().flatten()
    out = fn(*(x.index_select(0, index) for x in inputs))
    out = out if isinstance(out, tuple) else (out,)
    return tuple(fill.index_copy(0, index, value.to(fill.dtype)) for fill, value in zip(fills, out))


class StainBatch(dict):
    """A batch on the device: ``he``, ``ihc`` ``(B, 3, H, W)``, ``mask`` ``(B, 2)`` and, when present, ``label``."""


def prepare_stain_batch(
    batch: Mapping[str, Any], device: torch.device | str, channels_last: bool = False, non_blocking: bool = False
) -> StainBatch:
    """Move the stains, mask and label of a collated batch to ``device`` as plain tensors.

    Args:
        batch: output of the bundle's preprocessing and a MONAI data loader.
        device: target device.
        channels_last: store the images in channels-last memory format.
        non_blocking: asynchronous host-to-device copies.

    Returns:
        A :class:`StainBatch` (MetaTensor metadata dropped; images float32, mask float32, label long).

    Raises:
        KeyError: if the batch lacks ``he``, ``ihc`` or ``mask``.
    """
    missing = [k for k in (HE_KEY, IHC_KEY, MASK_KEY) if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected the output of the bundle's stain preprocessing")
    memory = torch.channels_last if channels_last else torch.contiguous_format
    out = StainBatch()
    for key in (HE_KEY, IHC_KEY):
        image = torch.as_tensor(batch[key]).as_subclass(Tensor)
        out[key] = image.to(device=device, dtype=torch.float32, non_blocking=non_blocking, memory_format=memory)
    out[MASK_KEY] = torch.as_tensor(batch[MASK_KEY]).as_subclass(Tensor).to(device, dtype=torch.float32)
    if LABEL_KEY in batch:
        out[LABEL_KEY] = torch.as_tensor(batch[LABEL_KEY]).as_subclass(Tensor).to(device, dtype=torch.long)
    return out


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for ``device``: float16 on CUDA, bfloat16 on the CPU; a no-op when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)
