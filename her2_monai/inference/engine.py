"""MONAI evaluator that runs the deploy network over an inference dataset (the bundle's ``evaluator``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from torch import nn

from her2_monai.inference.predictor import forward_stain_batch
from her2_monai.utils import as_bool

__all__ = ["HER2InferenceEvaluator"]


class HER2InferenceEvaluator(Evaluator):
    """Predict every batch with :func:`~her2_monai.inference.predictor.forward_stain_batch`.

    ``engine.state.output`` per iteration (decollated into one dict per sample, then post-processed) holds ``pred``
    (logits; probabilities after the bundle's post-processing), ``scenario``, ``detected_stains``,
    ``stain_confidence`` and ``stain_known``; handlers such as
    :class:`~her2_monai.inference.writer.PredictionWriter` turn them into files.

    Args:
        device: device to run on.
        val_data_loader: loader of :func:`~her2_monai.inference.records.inference_transforms` batches.
        network: deploy network with ``net`` and ``selector`` submodules (weights loaded).
        inferer: calls the classifier as ``inferer(he, net, ihc, mask)`` (default ``SimpleInferer``).
        amp: mixed precision (float16 on CUDA, bfloat16 on CPU).
        kwargs: passed on to :class:`monai.engines.Evaluator` (``postprocessing``, ``val_handlers``...).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: nn.Module,
        inferer: Inferer | None = None,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, amp=as_bool(amp, "amp"), **kwargs)
        for name in ("net", "selector"):
            if not isinstance(getattr(network, name, None), nn.Module):
                raise ValueError(f"network must be a deploy network with a '{name}' submodule (HER2BundleNet)")
        self.network = network
        self.inferer = inferer if inferer is not None else SimpleInferer()

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        engine.state.output = forward_stain_batch(
            self.network, batchdata, engine.state.device, self.inferer, bool(self.amp)
        )
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
