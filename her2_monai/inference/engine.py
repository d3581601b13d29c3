"""MONAI evaluator that runs the deployed model over an inference dataset (the bundle's ``evaluator``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer

from her2_monai.constants import HE_KEY, IHC_KEY, MASK_KEY, STAIN_KNOWN_KEY
from her2_monai.inference.deploy import HER2Deploy
from her2_monai.stain_batch import prepare_stain_batch
from her2_monai.utils import as_bool

__all__ = ["HER2InferenceEvaluator"]


class HER2InferenceEvaluator(Evaluator):
    """Predict every batch with :meth:`HER2Deploy.predict_batch <her2_monai.inference.deploy.HER2Deploy.predict_batch>`.

    ``engine.state.output`` per iteration (decollated into one dict per sample, then post-processed) holds ``pred``
    (logits; probabilities after the bundle's post-processing), ``scenario``, ``detected_stains``,
    ``stain_confidence`` and ``stain_known``; handlers such as
    :class:`~her2_monai.inference.writer.PredictionWriter` turn them into files.

    Args:
        device: device to run on.
        val_data_loader: loader of the bundle's inference preprocessing.
        network: the deployed model.
        inferer: calls ``inferer(he, network.predict_batch, ihc, mask, stain_known)`` (default ``SimpleInferer``).
        amp: mixed precision (float16 on CUDA, bfloat16 on CPU).
        kwargs: passed on to :class:`monai.engines.Evaluator` (``postprocessing``, ``val_handlers``...).

    Raises:
        TypeError: if ``network`` is not a :class:`~her2_monai.inference.deploy.HER2Deploy`.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: HER2Deploy,
        inferer: Inferer | None = None,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, amp=as_bool(amp, "amp"), **kwargs)
        if not isinstance(network, HER2Deploy):
            raise TypeError(f"network must be the deployed model (HER2Deploy), got {type(network).__name__}")
        self.network = network
        self.inferer = inferer if inferer is not None else SimpleInferer()

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_stain_batch(batchdata, engine.state.device, non_blocking=engine.non_blocking)
        known = batchdata.get(STAIN_KNOWN_KEY)
        engine.state.output = self.inferer(
            batch[HE_KEY], self.network.predict_batch, batch[IHC_KEY], batch[MASK_KEY], known, bool(self.amp)
        )
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
