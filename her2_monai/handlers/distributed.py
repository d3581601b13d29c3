"""Handlers for multi-process (DDP) training."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Engine, Events

__all__ = ["BroadcastBuffers"]


class BroadcastBuffers:
    """Copy the buffers (BatchNorm running statistics) of rank ``src`` to every process when an engine starts.

    Under ``DistributedDataParallel`` the weights are identical on every process, but each process updates its
    BatchNorm statistics with its own last batch after DDP's pre-forward broadcast, so they differ slightly at the end
    of an epoch. Attached to a validation evaluator that shards the validation set over processes, this makes every
    process validate exactly the model that rank 0 checkpoints and saves. Without an initialised process group it does
    nothing, so single-process configs may keep it.

    Args:
        network: the network (a DDP wrapper is unwrapped).
        src: rank whose buffers are copied.
    """

    def __init__(self, network: nn.Module, src: int = 0) -> None:
        self.network = network
        self.src = src

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        module = getattr(self.network, "module", self.network)
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, src=self.src)
