"""The trainer base class shared by both training stages."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from torch.optim import Optimizer

from her2_monai.utils import as_bool

__all__ = ["AmpTrainer"]


class AmpTrainer(Trainer):
    """A :class:`monai.engines.Trainer` for subclasses with their own iteration, whose mixed precision suits the device.

    ``Trainer.run`` creates a CUDA gradient scaler whenever ``amp`` is on; on the CPU (bfloat16 autocast, which needs
    no scaling) that scaler disables itself, and :meth:`optimizer_step` goes through it either way. Batches are not
    decollated: iterations return dicts of floats and tensors for the handlers.

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
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=as_bool(amp, "amp"),
            **kwargs,
        )

    def run(self) -> None:  # type: ignore[override]
        """Train (from the last state when called again, or after a resume handler has restored one)."""
        with warnings.catch_warnings():
            # On the CPU the CUDA scaler made by Trainer.run announces that it disables itself; that is intended.
            warnings.filterwarnings("ignore", message=".*GradScaler.*")
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            super().run()

    def optimizer_step(self, optimizer: Optimizer, loss: torch.Tensor, clip_norm: float | None = None) -> None:
        """Backpropagate ``loss`` (through the gradient scaler when one is active) and step ``optimizer``.

        Args:
            optimizer: the optimizer to step.
            loss: scalar loss.
            clip_norm: maximum gradient norm (``None``: no clipping).
        """
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        (scaler.scale(loss) if scaler else loss).backward()
        if clip_norm:
            if scaler:
                scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
