"""Stage 2: training a missing-modality HER2 classifier (the CM-GAN, if any, stays frozen inside the network)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer, SimpleInferer
from torch.optim import Optimizer

from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY
from her2_monai.engines.base import AmpTrainer
from her2_monai.engines.utils import autocast, prepare_stain_batch
from her2_monai.utils import as_bool

__all__ = ["StainClassifierTrainer", "unwrap"]


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model itself)."""
    return getattr(network, "module", network)


class StainClassifierTrainer(AmpTrainer):
    """Supervised training of any model with the ``forward(he, ihc, mask) -> {"logits", ...}`` interface.

    The loss is ``loss_function(logits, label)`` (class-weighted cross-entropy in the bundle) plus the model's own
    ``auxiliary_losses(outputs, mask, label)`` (DCO + DAO for :class:`~her2_monai.networks.her2net.HER2FlexibleNet`,
    MoFe for SimMLM, none for MoRA), already weighted by the model. Unlabelled samples (label ``-1``) are skipped.

    Per-iteration output: ``loss``, ``ce`` and each auxiliary term, as floats (for MONAI's stats and MLflow handlers).

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: loader of :func:`~her2_monai.transforms.stain_transforms` batches.
        network: the classifier (possibly DDP-wrapped).
        optimizer: optimizer over its trainable parameters.
        loss_function: classification loss on ``(logits (B, 4), label (B,))``.
        inferer: calls the network as ``inferer(he, network, ihc, mask)`` (default ``SimpleInferer``).
        amp: mixed precision (float16 + gradient scaling on CUDA, bfloat16 on CPU).
        channels_last: channels-last memory format for inputs.
        grad_clip: maximum gradient norm (``None``: no clipping).
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        train_handlers: MONAI/ignite handlers to attach.
        kwargs: passed on to :class:`monai.engines.Trainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: nn.Module | None = None,
        inferer: Inferer | None = None,
        amp: bool = False,
        channels_last: bool = False,
        grad_clip: float | None = None,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, amp, epoch_length, train_handlers, **kwargs)
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function if loss_function is not None else nn.CrossEntropyLoss()
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.channels_last = as_bool(channels_last, "channels_last")
        self.grad_clip = grad_clip

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_stain_batch(batchdata, engine.state.device, self.channels_last, engine.non_blocking)
        if LABEL_KEY not in batch:
            raise KeyError("classifier batches need a 'label'; check the datalist and the transforms")
        keep = batch[LABEL_KEY] >= 0
        if not bool(keep.any()):
            return {"loss": float("nan"), "skipped": True}
        he, ihc, mask, label = (batch[k][keep] for k in (HE_KEY, IHC_KEY, MASK_KEY, LABEL_KEY))
        self.network.train()
        with autocast(engine.state.device, self.amp):
            outputs = self.inferer(he, self.network, ihc, mask)
            aux = unwrap(self.network).auxiliary_losses(outputs, mask, label)
        ce = self.loss_function(outputs["logits"].float(), label)
        loss = ce + sum((v.float() for v in aux.values()), torch.zeros((), device=ce.device))
        self.optimizer_step(self.optimizer, loss, clip_norm=self.grad_clip)
        output: dict[str, Any] = {"loss": loss.item(), "ce": ce.item()}
        output.update({k: float(v) for k, v in aux.items()})
        return output
