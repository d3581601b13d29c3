"""Distributed data parallel (DDP) helpers for the multi-GPU bundle config (``bundle/configs/multi_gpu_train.json``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["wrap_ddp", "is_distributed"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (``torchrun`` + ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def wrap_ddp(module: nn.Module, device: torch.device | str, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap ``module`` (already on ``device``) in ``DistributedDataParallel`` for one process per device.

    On CUDA the wrapper gets ``device_ids=[device]`` (one GPU per process); on the CPU (gloo backend) it gets none, as
    DDP requires. Parameters with ``requires_grad=False`` when this is called (a frozen CM-GAN, the stages frozen by
    hybrid unfreezing) are left out of gradient synchronisation, so freeze before wrapping and do not unfreeze after.

    Args:
        module: the network, already moved to ``device``.
        device: this process's device.
        ddp_kwargs: other ``DistributedDataParallel`` arguments (e.g. ``find_unused_parameters``).

    Returns:
        The DDP wrapper (the network itself is ``wrapper.module``).

    Raises:
        RuntimeError: if no process group is initialised.
    """
    if not is_distributed():
        raise RuntimeError(
            "DistributedDataParallel needs an initialised process group: launch with torchrun and call "
            "torch.distributed.init_process_group first (multi_gpu_train.json does this in 'initialize')"
        )
    device = torch.device(device)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **ddp_kwargs)
