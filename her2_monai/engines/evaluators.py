"""Evaluators: HER2 classification in every missing-stain scenario, and stain translation quality."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines import Evaluator
from monai.inferers import Inferer, SimpleInferer

from her2_monai.calibration.ood_features import BASE_INPUTS, ImageStatistics, classify_scenarios
from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY, SCENARIOS
from her2_monai.stain_batch import autocast, prepare_stain_batch
from her2_monai.utils import as_bool

__all__ = ["ScenarioEvaluator", "TranslationEvaluator"]


class ScenarioEvaluator(Evaluator):
    """Run a classifier on every labelled sample once per scenario (dual, H&E only, IHC only).

    The hidden stain is zeroed exactly as a missing stain is at inference, so the model fills it (CM-GAN synthesis
    or feature substitution) as it would in the clinic. ``engine.state.output`` per iteration is
    ``{"logits": {scenario: (N, 4)}, "label": {scenario: (N,)}}`` for metrics such as
    :class:`~her2_monai.metrics.classification.ScenarioClassificationMetric`, plus one such dict per name in
    ``output_keys`` (other network outputs, e.g. ``embedding`` and ``stain_attention`` for calibration and reports)
    and per name in ``ood_inputs`` (the per-stain inputs of the model's out-of-distribution score, e.g. ``image_he``:
    :mod:`~her2_monai.calibration.ood_features`).

    Args:
        device: device to run on.
        val_data_loader: loader of batches of the bundle's stain preprocessing.
        network: classifier with the ``forward(he, ihc, mask)`` interface.
        scenarios: scenarios to evaluate.
        inferer: calls the network as ``inferer(he, network, ihc, mask)`` (default ``SimpleInferer``).
        amp: mixed precision (float16 on CUDA, bfloat16 on CPU).
        channels_last: channels-last memory format for inputs.
        output_keys: further network outputs to return per scenario (as float tensors).
        ood_inputs: OOD inputs to compute and return per scenario (``logits`` and ``embedding`` are outputs; a name
            the network cannot give, e.g. ``cycle_he`` without a CM-GAN, raises on the first batch).
        kwargs: passed on to :class:`monai.engines.Evaluator` (``key_val_metric``, ``val_handlers``...).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: nn.Module,
        scenarios: Sequence[str] = SCENARIOS,
        inferer: Inferer | None = None,
        amp: bool = False,
        channels_last: bool = False,
        output_keys: Sequence[str] = (),
        ood_inputs: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, amp=as_bool(amp, "amp"), **kwargs)
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.output_keys = tuple(k for k in output_keys if k not in ("logits", "label"))
        self.ood_inputs = tuple(k for k in ood_inputs if k not in BASE_INPUTS and k not in self.output_keys)
        self._statistics = ImageStatistics()
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; expected a subset of {SCENARIOS}")
        self.network = network
        self.scenarios = tuple(scenarios)
        self.channels_last = as_bool(channels_last, "channels_last")

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_stain_batch(batchdata, engine.state.device, self.channels_last, engine.non_blocking)
        self.network.eval()
        keys = ("logits", "label", *self.output_keys, *self.ood_inputs)
        outputs: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
        with torch.no_grad(), autocast(engine.state.device, self.amp):
            for scenario, selected, out, extra in classify_scenarios(
                self.network,
                batch,
                self.scenarios,
                self.ood_inputs,
                forward=lambda *args: self.inferer(args[0], self.network, *args[1:]),
                image_statistics=self._statistics,
            ):
                for key, values in extra.items():
                    outputs[key][scenario] = torch.as_tensor(values, dtype=torch.float32)
                outputs["label"][scenario] = batch[LABEL_KEY][selected]
                for key in ("logits", *self.output_keys):
                    if key in out:  # e.g. stain_attention: only networks with stain attention have it
                        outputs[key][scenario] = out[key].float()
        return outputs


class TranslationEvaluator(Evaluator):
    """Translate the validation pairs in both directions with a :class:`~her2_monai.networks.cmgan.CrossModalGAN`.

    Per iteration ``engine.state.output`` holds the real and generated images (``he``, ``ihc``, ``fake_he``,
    ``fake_ihc``, each ``(N, 3, H, W)`` in ``[-1, 1]``) of the samples that have both stains, for PSNR/SSIM metrics and
    image-grid handlers. Generators run in eval mode, as in the BCI evaluation convention.

    Args:
        device: device to run on.
        val_data_loader: loader of batches of the bundle's stain preprocessing.
        network: the CM-GAN (:class:`~her2_monai.networks.cmgan.CrossModalGAN`).
        amp: mixed precision.
        kwargs: passed on to :class:`monai.engines.Evaluator`.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: nn.Module,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, amp=as_bool(amp, "amp"), **kwargs)
        self.network = network

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_stain_batch(batchdata, engine.state.device, False, engine.non_blocking)
        dual = (batch[MASK_KEY] > 0).all(dim=1)
        he, ihc = batch[HE_KEY][dual], batch[IHC_KEY][dual]
        self.network.eval()
        with torch.no_grad(), autocast(engine.state.device, self.amp):
            fake_ihc = self.network.he_to_ihc(he).float() if len(he) else he
            fake_he = self.network.ihc_to_he(ihc).float() if len(ihc) else ihc
        return {"he": he, "ihc": ihc, "fake_he": fake_he, "fake_ihc": fake_ihc}
