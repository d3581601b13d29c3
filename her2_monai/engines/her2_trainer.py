"""Stage 2: training a missing-modality HER2 classifier (the CM-GAN, if any, stays frozen inside the network)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer, SimpleInferer
from torch.optim import Optimizer

from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY
from her2_monai.engines.base import AmpTrainer
from her2_monai.losses.classification import ClassificationLoss
from her2_monai.stain_batch import autocast, prepare_stain_batch
from her2_monai.utils import as_bool

__all__ = ["HER2Trainer"]

LossFunction = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]


class HER2Trainer(AmpTrainer):
    """Supervised training of a HER2 score classifier on batches whose samples have H&E, IHC or both.

    The network has the ``forward(he, ihc, mask) -> {"logits", ...}`` interface (:class:`HER2FlexibleNet`, or the
    alternatives); the ``loss_function`` -- a config item, as in MONAI's ``SupervisedTrainer`` -- takes the output
    dict, the labels and the mask, and returns its named terms with the total under ``"loss"``
    (:class:`~her2_monai.losses.classification.HER2Loss` for class-weighted CE + DAO + DCO). The trainer neither knows
    nor reaches for the terms: it backpropagates ``"loss"`` and logs every term.

    Per-iteration output: each term as a float (``loss``, ``ce``, ``dao``, ``dco`` for :class:`HER2Loss`), for MONAI's
    stats and MLflow handlers.

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: loader of the bundle's stain preprocessing.
        network: the classifier (possibly DDP-wrapped).
        optimizer: optimizer over its trainable parameters.
        loss_function: ``(outputs, label, mask) -> {"loss": total, ...}`` (default: plain cross-entropy).
        inferer: calls the network as ``inferer(he, network, ihc, mask)`` (default ``SimpleInferer``).
        amp: mixed precision (float16 + gradient scaling on CUDA, bfloat16 on CPU).
        channels_last: channels-last memory format for inputs.
        grad_clip: maximum gradient norm (``None``: no clipping).
        epoch_length: as :class:`~her2_monai.engines.base.AmpTrainer`.
        train_handlers: as :class:`~her2_monai.engines.base.AmpTrainer`.
        kwargs: as :class:`~her2_monai.engines.base.AmpTrainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: LossFunction | None = None,
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
        self.loss_function = loss_function if loss_function is not None else ClassificationLoss()
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.channels_last = as_bool(channels_last, "channels_last")
        self.grad_clip = grad_clip

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_stain_batch(batchdata, engine.state.device, self.channels_last, engine.non_blocking)
        if LABEL_KEY not in batch:
            raise KeyError("classifier batches need a 'label'; check the datalist and the preprocessing")
        self.network.train()
        with autocast(engine.state.device, self.amp):
            outputs = self.inferer(batch[HE_KEY], self.network, batch[IHC_KEY], batch[MASK_KEY])
        terms = self.loss_function(outputs, batch[LABEL_KEY], batch[MASK_KEY])
        if "loss" not in terms:
            raise KeyError(f"the loss function must return its total under 'loss'; it returned {sorted(terms)}")
        self.optimizer_step(self.optimizer, terms["loss"], clip_norm=self.grad_clip)
        return {name: float(value.detach()) for name, value in terms.items()}
