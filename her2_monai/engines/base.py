"""The trainer base class shared by both training stages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from torch.optim import Optimizer

from her2_monai.engines.utils import make_grad_scaler
from her2_monai.utils import as_bool

__all__ = ["AmpTrainer"]


class AmpTrainer(Trainer):
    """A :class:`monai.engines.Trainer` whose mixed precision suits the device, for subclasses with their own iteration.

    MONAI's ``Trainer.run`` always creates a CUDA gradient scaler when ``amp`` is set; here the scaler is active only
    for float16 on CUDA (CPU autocast uses bfloat16, which needs none). Batches are not decollated: iterations
    return dicts of floats and tensors for the handlers.

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: training data.
        amp: mixed precision (float16 + gradient scaling on CUDA, bfloat16 on CPU).
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        train_handlers: MONAI/ignite handlers to attach.
        kwargs: passed on to :class:`monai.engines.Trainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        amp: bool = False,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        amp = as_bool(amp, "amp")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=amp,
            **kwargs,
        )
        self.scaler = make_grad_scaler(device, amp)

    def run(self) -> None:  # type: ignore[override]
        """Train (from the last state when called again, or after a resume handler has restored one)."""
        self.scaler = make_grad_scaler(self.state.device, self.amp)
        Workflow.run(self)

    def optimizer_step(self, optimizer: Optimizer, loss: torch.Tensor, clip_norm: float | None = None) -> None:
        """Backpropagate ``loss`` through the scaler and step ``optimizer``, optionally clipping the gradient norm."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip_norm:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
