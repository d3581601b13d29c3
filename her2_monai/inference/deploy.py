"""The deployment module: one object serves ``predict``, the inference workflow, TorchScript export and serving.

:class:`HER2Deploy` wraps a trained :class:`~her2_monai.networks.her2net.HER2FlexibleNet` (which holds its frozen
CM-GAN and branch selector) and offers the two ways a deployed model is called:

* :meth:`HER2Deploy.forward` -- one tensor in, logits out: ``(B, 6, H, W)`` is H&E then IHC; ``(B, 3, H, W)`` is one
  image of either stain, routed per sample by the branch selector. This is MONAI's bundle contract
  (``verify_net_in_out``, ``ckpt_export``) and the exported TorchScript.
* :meth:`HER2Deploy.predict_batch` -- a batch of records whose stains are declared or unknown, with everything the
  JSON answer needs (logits, scenario, the selector's call and confidence per image, the out-of-distribution score
  of the model's record -- by default from the stain and texture statistics of each given image, computed here, so
  ``predict``, the inference workflow, whole slides and MONAI Label refuse alike --, the referral thresholds and, with
  MC-dropout passes, the predictive entropy and mutual information).

The module adds no weights of its own: its state dict *is* the classifier's (the ``net.`` prefix is dropped on save
and added on load), so ``models/model.pt`` loads into either. The calibration record in the model's metadata
(:mod:`her2_monai.calibration.record`) is applied by both: logits are divided by the fitted temperature, so a
softmax of any output -- Python or exported TorchScript -- gives calibrated probabilities (the argmax is unchanged).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from her2_monai.calibration.ood_features import BASE_INPUTS, classify_with_ood_inputs
from her2_monai.calibration.record import CALIBRATION_KEY
from her2_monai.calibration.scorer import TrustScorer
from her2_monai.calibration.uncertainty import dropout_head, mc_dropout_head
from her2_monai.constants import SCENARIOS, STAIN_KNOWN_KEY
from her2_monai.data.provenance import model_provenance
from her2_monai.inference.optimize import inference_optimization, optimize_for_inference
from her2_monai.networks.factory import build_model
from her2_monai.networks.her2net import HER2FlexibleNet
from her2_monai.runtime import inductor_weight_prepack
from her2_monai.stain_batch import assign_unknown_stains, autocast, check_mask, route_unknown_stains
from her2_monai.transforms.stain_settings import RECORD_KEY as NORMALIZATION_RECORD_KEY
from her2_monai.utils import as_bool

__all__ = [
    "PRED_KEY",
    "SCENARIO_KEY",
    "STAINS_KEY",
    "STAIN_PROB_KEY",
    "STAIN_KNOWN_KEY",
    "NO_IMAGE",
    "OOD_KEY",
    "TRUST_KEYS",
    "HER2Deploy",
]

#: Output keys of :meth:`HER2Deploy.predict_batch`.
PRED_KEY = "pred"
SCENARIO_KEY = "scenario"
STAINS_KEY = "detected_stains"
STAIN_PROB_KEY = "stain_confidence"
#: ``detected_stains`` value of an empty slot.
NO_IMAGE = -1
#: Output keys of the calibration record's answers (``ood_score`` and its threshold NaN without an OOD score).
OOD_KEY = "ood_score"
TRUST_KEYS = (OOD_KEY, "ood_threshold", "refer_threshold", "temperature", "calibrated")

_PREFIX = "net."
_LOG = logging.getLogger(__name__)


def _inductor_config() -> Any:
    """``torch._inductor.config``, imported when a compiled network is first run (it is slow to import)."""
    import torch._inductor.config as config

    return config


#: How far the logits of a compiled network may be from the eager ones, ``(atol, rtol)``: in float32, and where bf16
#: rounding differs between the two graphs (bf16 autocast or islands). A compiler that miscompiles is farther off:
#: frozen ``torch.compile`` with prepacked weights and AVX2 kernels gave logits 2 to 1e35 away on the paper's
#: architecture (torch 2.13.0+cpu, ``docs/performance.md``), where the fp32 graphs agree within 1e-5 and the bf16 ones
#: within 0.06.
COMPILED_TOLERANCE = {"fp32": (1e-3, 1e-3), "bf16": (0.25, 0.1)}


def compiled_mismatch(found: Tensor, expected: Tensor, low_precision: bool) -> str | None:
    """Why the logits of a compiled network are not those of the eager network, or ``None`` when they agree.

    Args:
        found: ``(B, K)`` logits of the compiled network.
        expected: ``(B, K)`` logits of the eager network on the same input.
        low_precision: the call ran in bf16 (autocast or bf16 islands): the looser of :data:`COMPILED_TOLERANCE`.

    Returns:
        ``None``, or one line with the largest difference and the tolerance.
    """
    atol, rtol = COMPILED_TOLERANCE["bf16" if low_precision else "fp32"]
    found, expected = found.detach().float(), expected.detach().float()
    difference = (found - expected).abs().nan_to_num(nan=float("inf"))
    if found.shape == expected.shape and bool((difference <= atol + rtol * expected.abs()).all()):
        return None
    largest = float(difference.max()) if difference.numel() else float("nan")
    return f"logits up to {largest:.3g} from the eager network's, tolerance {atol} + {rtol} x |eager|"


def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in list(state_dict):
        if key.startswith(prefix + _PREFIX):
            state_dict[prefix + key[len(prefix) + len(_PREFIX) :]] = state_dict.pop(key)


def _drop_inference_copy(module: nn.Module, _: Any) -> None:
    """Forget the optimised inference copy of a :class:`HER2Deploy` whose weights were just loaded."""
    module._fast = None
    module._compiled = None


def _add_prefix(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    if any(key.startswith(prefix + _PREFIX) for key in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _PREFIX + key[len(prefix) :]] = state_dict.pop(key)


class _TracedDeploy(nn.Module):
    """What ``torch.jit.script`` compiles for a :class:`HER2Deploy`: traces of each input layout behind one module.

    A trace freezes Python branches, so one trace cannot serve both the H&E+IHC and the single-stain inputs. Besides
    ``forward``, the exported file keeps :meth:`classify_declared` (one image whose stain the caller declares) and
    :meth:`stain_probabilities` (the branch selector), so ``predict --torchscript`` gives the same answers as the
    Python model, ``image_size`` (the side the model was trained at), the calibration record's scalars: the
    ``temperature`` already applied to the logits, ``calibrated`` and the ``refer_thresholds`` of each scenario (in
    :data:`~her2_monai.constants.SCENARIOS` order), and ``provenance``, the model's training data
    (:func:`~her2_monai.data.provenance.model_provenance`) as a JSON string, and ``stain_normalization``, the
    model's stain-normalisation record as a JSON string (``"null"``: none), so the exported file needs no model file
    beside it. The out-of-distribution score is not exported (its statistics are plain data outside the graphs):
    ``predict --torchscript`` answers with ``ood_score`` null and never refers ``out_of_distribution``.
    """

    def __init__(
        self,
        dual: nn.Module,
        single: nn.Module,
        in_channels: int = 3,
        image_size: int = 64,
        temperature: float = 1.0,
        calibrated: bool = False,
        refer_thresholds: list[float] | None = None,
        provenance: str = "",
        stain_normalization: str = "null",
    ) -> None:
        super().__init__()
        self.dual = dual
        self.single = single
        self.in_channels = in_channels
        self.image_size = image_size
        self.temperature = float(temperature)
        self.calibrated = bool(calibrated)
        self.refer_thresholds: list[float] = [float(t) for t in (refer_thresholds or [])]
        self.provenance = str(provenance)
        self.stain_normalization = str(stain_normalization)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` (selector-routed) or ``(B, 2C, H, W)`` (H&E then IHC), in ``[-1, 1]`` -> ``(B, 4)``."""
        if x.dim() != 4:
            raise ValueError("expected a (B, C, H, W) tensor")
        if x.shape[1] == 2 * self.in_channels:
            return self.dual(x)
        if x.shape[1] == self.in_channels:
            return self.single(x)
        raise ValueError("expected 3 channels (one stain, routed by the selector) or 6 channels (H&E then IHC)")

    @torch.jit.export
    def classify_declared(self, x: Tensor, is_ihc: Tensor) -> Tensor:
        """Logits of single images whose stain is declared (``is_ihc`` ``(B,)`` bool)."""
        return self.single.classify_declared(x, is_ihc)

    @torch.jit.export
    def stain_probabilities(self, x: Tensor) -> Tensor:
        """The branch selector's ``(B, 2)`` probabilities (H&E, IHC) for single images."""
        return self.single.stain_probabilities(x)


class HER2Deploy(nn.Module):
    """The deployed HER2 model (see the module docstring).

    Args:
        net: the trained classifier; it needs a ``selector`` for images of unknown stain.
        trace_size: side in pixels of the example inputs traced for TorchScript export (the graphs are fully
            convolutional, so any size works afterwards).
        trace_batch: batch size of those example inputs.
        mc_dropout_passes: MC-dropout samples of the head's dropout per case in :meth:`predict_batch` (0 = off).
        calibrated: apply the temperature of the model's calibration record (``False``: raw logits).
        compile_network: run the classifier of :meth:`predict_batch` through ``torch.compile``, compiled on the
            first batch and again when the input shape changes. It pays for many batches of one size (``run
            inferring`` on a folder, whole slides); see ``docs/performance.md`` for the gain and the compile time
            measured on a 2-core CPU. If compilation fails (e.g. no C++ compiler), a warning is logged and the eager
            network answers.
        optimize: let :meth:`predict_batch` and :meth:`route` run an inference copy of the network with its
            BatchNorms folded into the convolutions and, under bf16 autocast on the CPU, its CM-GAN generators and
            encoder trunks in bf16 channels-last throughout
            (:func:`~her2_monai.inference.optimize.optimize_for_inference`; built on the first call, rebuilt when
            weights are loaded). ``None`` reads ``$HER2_INFERENCE_OPTIMIZE``
            (``auto``, the default, or ``off``). :meth:`forward`, the state dict and the exports use the network as
            trained either way.

    Raises:
        ValueError: for a trace size below 8, a batch below 1 or negative passes.
    """

    def __init__(
        self,
        net: HER2FlexibleNet,
        trace_size: int = 64,
        trace_batch: int = 2,
        mc_dropout_passes: int = 0,
        calibrated: bool = True,
        compile_network: bool | str = False,
        optimize: bool | str | None = None,
    ) -> None:
        super().__init__()
        if trace_size < 8 or trace_batch < 1:
            raise ValueError(f"trace_size must be >= 8 and trace_batch >= 1, got {trace_size} and {trace_batch}")
        if int(mc_dropout_passes) < 0:
            raise ValueError(f"mc_dropout_passes must be >= 0, got {mc_dropout_passes}")
        if int(mc_dropout_passes) > 0 and dropout_head(net) is None:
            raise ValueError(
                f"mc_dropout_passes needs a head of dropout then a linear layer; {type(net).__name__} has none"
            )
        self.net = net
        self.trace_size = int(trace_size)
        self.trace_batch = int(trace_batch)
        self.mc_dropout_passes = int(mc_dropout_passes)
        self.calibrated = bool(calibrated)
        self.compile_network = as_bool(compile_network, "compile")
        # A plain attribute (not a submodule): the compiled callable adds nothing to the state dict or to export.
        self._compiled: Callable[..., dict[str, Tensor]] | None = None
        # Input signatures (shapes, stains present) whose answer from ``_compiled`` was checked against the eager
        # network; emptied whenever a new compiled callable is made.
        self._checked_inputs: set[tuple] = set()
        self.optimize = inference_optimization(optimize)
        # The inference copy (see ``optimize``) and what it was built for, also a plain attribute.
        self._fast: tuple[tuple[bool, torch.device], nn.Module] | None = None
        self._trust: tuple[Any, TrustScorer] | None = None
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)
        self.register_load_state_dict_post_hook(_drop_inference_copy)

    @property
    def trust(self) -> TrustScorer:
        """The calibration record of the wrapped model (re-read when weights with another record are loaded)."""
        metadata = getattr(self.net, "metadata", None) or {}
        record = metadata.get(CALIBRATION_KEY) if self.calibrated else None
        if self._trust is None or self._trust[0] is not record:
            self._trust = (record, TrustScorer(record))
        return self._trust[1]

    @property
    def temperature(self) -> float:
        """The calibration temperature the logits are divided by (1 without a record or with ``calibrated=False``)."""
        return self.trust.temperature

    @property
    def provenance(self) -> dict[str, Any]:
        """What the wrapped model was trained on (:func:`~her2_monai.data.provenance.model_provenance` of its
        metadata; read again after weights with another record are loaded)."""
        return model_provenance(getattr(self.net, "metadata", None))

    @classmethod
    def from_model_file(
        cls,
        model_file: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
        missing_ok: bool = False,
        trace_size: int | None = None,
        channels_last: bool | str = False,
        mc_dropout_passes: int = 0,
        calibrated: bool = True,
        compile_network: bool | str = False,
        optimize: bool | str | None = None,
    ) -> HER2Deploy:
        """Rebuild the deployed model from ``models/model.pt`` (architecture from its record, weights loaded).

        Args:
            model_file: the classifier's weights file.
            overrides: configured architecture options, each checked against the record.
            missing_ok: without a file, an untrained model from ``overrides`` (for checks before training).
            trace_size: export trace size (default: the recorded image size, else 64).
            channels_last: run the convolutions on channels-last tensors (see :mod:`her2_monai.runtime`).
            mc_dropout_passes: MC-dropout samples per case in :meth:`predict_batch` (0 = off).
            calibrated: apply the recorded temperature.
            compile_network: ``torch.compile`` the classifier for :meth:`predict_batch` (see the class).
            optimize: the inference rewrites of :meth:`predict_batch` (see the class; ``None``: the environment's).

        Returns:
            The module in eval mode.

        Raises:
            FileNotFoundError: if the file is missing and not ``missing_ok``.
            ValueError: for a foreign or damaged file, or overrides that disagree with it.
        """
        net = build_model(model_file, overrides, missing_ok=missing_ok)
        if as_bool(channels_last, "channels_last"):
            net.channels_last = True
            net.to(memory_format=torch.channels_last)
        size = trace_size or int(net.metadata.get("image_size") or 64)
        return cls(
            net,
            trace_size=size,
            mc_dropout_passes=int(mc_dropout_passes),
            calibrated=calibrated,
            compile_network=compile_network,
            optimize=optimize,
        ).eval()

    @property
    def in_channels(self) -> int:
        """Channels per stain image."""
        return self.net.in_channels

    def _selector(self, net: nn.Module | None = None) -> nn.Module:
        net = self.net if net is None else net
        if net.selector is None:
            raise ValueError(
                "this model has no branch selector, so images of unknown stain cannot be routed; declare the stain "
                "(--he / --ihc) or use a model trained by the bundle (its model.pt holds the selector)"
            )
        return net.selector

    def inference_network(self, amp: bool = False) -> nn.Module:
        """The network :meth:`predict_batch` runs: the optimised inference copy (see the class's ``optimize``) in
        eval mode, else the network as trained.

        Args:
            amp: whether the call runs under mixed precision (on the CPU, the copy then holds bf16 islands).

        Returns:
            The network to call.
        """
        if not self.optimize or self.training or not isinstance(self.net, HER2FlexibleNet):
            return self.net
        device = next(self.net.parameters()).device
        key = (bool(amp) and device.type == "cpu", device)
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, optimize_for_inference(self.net, bf16=key[0]))
            self._compiled = None
        return self._fast[1]

    def forward(self, x: Tensor) -> Tensor:
        """Predict HER2 logits from one tensor.

        Args:
            x: ``(B, C, H, W)`` (single stain, routed by the selector) or ``(B, 2C, H, W)`` (H&E then IHC), in
                ``[-1, 1]``.

        Returns:
            ``(B, num_classes)`` logits, divided by the calibration temperature.

        Raises:
            ValueError: for any other shape.
        """
        c = self.in_channels
        if x.ndim != 4 or x.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"expected (B, {c}, H, W) single-stain or (B, {2 * c}, H, W) H&E+IHC input, got {tuple(x.shape)}"
            )
        if x.shape[1] == 2 * c:
            available = torch.ones((x.shape[0], 2), dtype=torch.bool, device=x.device)
            logits = self.net.forward_available(x[:, :c], x[:, c:], available, all_available=True)["logits"]
            return logits / self.temperature
        he, ihc, mask = route_unknown_stains(x, self._selector()(x).argmax(dim=1) == 1)
        return self.net.forward_available(he, ihc, mask > 0.5)["logits"] / self.temperature

    def classify_declared(self, x: Tensor, is_ihc: Tensor) -> Tensor:
        """Logits of single images whose stain the caller declares (the selector is not consulted).

        Args:
            x: ``(B, C, H, W)`` in ``[-1, 1]``.
            is_ihc: ``(B,)`` bool, true where the image is IHC.

        Returns:
            ``(B, num_classes)`` logits, divided by the calibration temperature.
        """
        he, ihc, mask = route_unknown_stains(x, is_ihc)
        return self.net.forward_available(he, ihc, mask > 0.5)["logits"] / self.temperature

    def stain_probabilities(self, x: Tensor) -> Tensor:
        """The branch selector's ``(B, 2)`` probabilities (column 0 H&E, 1 IHC) for single images ``(B, C, H, W)``."""
        return self._selector()(x).float().softmax(dim=1)

    @torch.no_grad()
    def route(
        self, he: Tensor, ihc: Tensor, mask: Tensor, stain_known: Tensor | None = None, amp: bool = False
    ) -> dict[str, Tensor]:
        """Label every given image with the selector and put unknown-stain images into the slot it calls.

        Declared stains are used as given (the selector may not override a user's statement), but the selector still
        labels every given image, so a mislabelled input shows up in ``detected_stains``. An unknown-stain sample
        (``stain_known == 0``, its image in the H&E slot) is routed as the selector says, exactly as :meth:`forward`
        routes a 3-channel input. The selector runs only on slots that hold an image.

        Args:
            he: ``(B, C, H, W)`` in ``[-1, 1]``, zeros where missing.
            ihc: ``(B, C, H, W)``.
            mask: ``(B, 2)`` availability as given (an unknown-stain image counts as H&E).
            stain_known: ``(B,)`` 1 = stains declared, 0 = selector decides (``None``: all declared).
            amp: mixed precision.

        Returns:
            ``he``, ``ihc``, ``mask`` (routed), ``detected_stains`` ``(B, 2)`` long (0 = H&E, 1 = IHC, ``-1`` = no
            image; an unknown-stain image is reported in slot 0), ``stain_confidence`` ``(B, 2)`` (NaN = no image),
            ``stain_known`` ``(B,)`` bool.

        Raises:
            ValueError: for an invalid mask, or unknown stains with a model that has no selector.
        """
        present = check_mask(mask)
        n = mask.shape[0]
        known = torch.ones(n, dtype=torch.bool, device=mask.device)
        if stain_known is not None:
            known = torch.as_tensor(stain_known, device=mask.device).reshape(n) > 0.5
        device = he.device
        calls = torch.full((n, 2), NO_IMAGE, dtype=torch.long, device=device)
        confidence = torch.full((n, 2), float("nan"), device=device)
        self.eval()
        net = self.inference_network(amp)
        with autocast(device, amp):
            if net.selector is not None or not bool(known.all()):
                selector = self._selector(net)
                for slot, image in enumerate((he, ihc)):
                    rows = present[:, slot].nonzero().flatten()
                    if rows.numel():
                        prob = selector(image.index_select(0, rows)).float().softmax(dim=1)
                        calls[rows, slot] = prob.argmax(dim=1)
                        confidence[rows, slot] = prob.amax(dim=1)
        routed_he, routed_ihc, routed_mask = assign_unknown_stains(he, ihc, mask, ~known, calls[:, 0] == 1)
        return {
            "he": routed_he,
            "ihc": routed_ihc,
            "mask": routed_mask,
            STAINS_KEY: calls,
            STAIN_PROB_KEY: confidence,
            STAIN_KNOWN_KEY: known,
        }

    @torch.no_grad()
    def predict_batch(
        self, he: Tensor, ihc: Tensor, mask: Tensor, stain_known: Tensor | None = None, amp: bool = False
    ) -> dict[str, Tensor]:
        """HER2 logits for a batch of declared-stain and unknown-stain samples, with what the answer needs.

        Stains are routed by :meth:`route`; then the classifier runs once. The model's calibration record gives the
        temperature (applied to ``pred``), the referral threshold and the out-of-distribution score and threshold of
        each sample's scenario; ``mc_dropout_passes > 0`` adds MC-dropout uncertainty (the head's dropout, sampled on
        the embedding: see :mod:`her2_monai.calibration.uncertainty`).

        Args:
            he: ``(B, C, H, W)`` in ``[-1, 1]``, zeros where missing.
            ihc: ``(B, C, H, W)``.
            mask: ``(B, 2)`` availability as given (an unknown-stain image counts as H&E).
            stain_known: ``(B,)`` 1 = stains declared, 0 = selector decides (``None``: all declared).
            amp: mixed precision (float16 on CUDA, bfloat16 on the CPU).

        Returns:
            ``pred`` ``(B, K)`` float logits divided by the temperature; ``scenario`` ``(B,)`` long;
            ``detected_stains`` ``(B, 2)`` and ``stain_confidence`` ``(B, 2)`` (see :meth:`route`); ``stain_known``
            ``(B,)`` float; ``stain_attention`` ``(B, 2)``; ``ood_score``, ``ood_threshold`` (NaN without an OOD
            score), ``refer_threshold`` and ``temperature`` ``(B,)`` float; with MC dropout also ``entropy`` and
            ``mutual_information`` ``(B,)`` (nats).

        Raises:
            ValueError: for an invalid mask, or unknown stains with a model that has no selector.
        """
        routed = self.route(he, ihc, mask, stain_known, amp)
        device = he.device
        # The recorded OOD score may read more than the logits and embedding (e.g. the stain and texture statistics
        # of each given image): those are computed from this call, on the routed (real) images only.
        names = [name for name in self.trust.ood_inputs if name not in BASE_INPUTS]
        net = self.inference_network(amp)
        forward = functools.partial(self._classify, net=net)
        with autocast(device, amp):
            outputs, ood_inputs = classify_with_ood_inputs(
                net, routed["he"], routed["ihc"], routed["mask"], names, forward=forward
            )
        logits = outputs["logits"].float()
        scenario = outputs["scenario"]
        embedding = outputs["embedding"].float()
        scenarios = scenario.tolist()
        ood = self.trust.ood_scores(logits.cpu().numpy(), embedding.cpu().numpy(), ood_inputs)
        result = {
            PRED_KEY: logits / self.temperature,
            SCENARIO_KEY: scenario,
            STAINS_KEY: routed[STAINS_KEY],
            STAIN_PROB_KEY: routed[STAIN_PROB_KEY],
            STAIN_KNOWN_KEY: routed[STAIN_KNOWN_KEY].float(),
            OOD_KEY: torch.as_tensor(ood, dtype=torch.float32, device=device),
            "ood_threshold": torch.tensor([self.trust.ood_threshold(s) for s in scenarios], device=device),
            # float64: "refer every case" is stored as the float just above 1, which float32 would round to 1.
            "refer_threshold": torch.tensor(
                [self.trust.refer_threshold(s) for s in scenarios], dtype=torch.float64, device=device
            ),
            "temperature": torch.full((len(scenarios),), self.temperature, device=device),
            "calibrated": torch.full((len(scenarios),), float(self.trust.calibrated), device=device),
        }
        if "stain_attention" in outputs:  # HER2FlexibleNet; the comparison's alternatives have no stain attention
            result["stain_attention"] = outputs["stain_attention"].float()
        if self.mc_dropout_passes > 0:
            generator = torch.Generator().manual_seed(0)  # the same answer for the same input
            sampled = mc_dropout_head(net.head, embedding, self.mc_dropout_passes, self.temperature, generator)
            result["entropy"] = sampled["entropy"]
            result["mutual_information"] = sampled["mutual_information"]
        return result

    def _classify(self, he: Tensor, ihc: Tensor, mask: Tensor, net: nn.Module | None = None) -> dict[str, Tensor]:
        """The outputs of ``net`` (default: the trained network); through ``torch.compile`` with
        :attr:`compile_network` (eager if that fails, or if its first answer for an input signature is not the eager
        network's: :func:`compiled_mismatch`)."""
        net = self.net if net is None else net
        if not self.compile_network or self.training:
            return net(he, ihc, mask)
        if self._compiled is None:
            self._compiled = torch.compile(net.forward)
            self._checked_inputs = set()
        try:
            # Freezing: the weights become constants of the graph, so BatchNorm folds and oneDNN prepacks the
            # convolutions with the element-wise work (activations, residual adds) fused in; inference never changes
            # them. It is set around the call, not through ``torch.compile(options=...)``: compilation happens at the
            # first call, and (torch 2.13) the ``options`` route leaves the graph unfrozen -- every convolution then
            # stays a plain ``aten`` call (see ``tests/test_bundle_export.py``).
            # Prepacking only where it gave the right answers (AVX-512 kernels; see runtime.inductor_weight_prepack).
            prepack = inductor_weight_prepack(he.device)
            with _inductor_config().patch({"freezing": True, "cpp.weight_prepack": prepack}):
                outputs = self._compiled(he, ihc, mask)
        except Exception as err:  # noqa: BLE001  (any compiler failure: the eager network gives the same answer)
            _LOG.warning("torch.compile failed (%s: %s); predicting with the eager network", type(err).__name__, err)
            self.compile_network = False
            return net(he, ihc, mask)
        # A compiler can also be wrong without failing: the first answer for each input signature (each one compiles
        # its own graph) is checked against the eager network's, once.
        autocast_on = torch.is_autocast_enabled(he.device.type)
        # the stains present steer the forward pass (generator or not), so each pattern is its own graph
        stains = frozenset(map(tuple, (mask > 0.5).tolist()))
        signature = (tuple(he.shape), tuple(ihc.shape), he.dtype, he.device, autocast_on, stains)
        if signature not in self._checked_inputs:
            low_precision = autocast_on or any(p.dtype == torch.bfloat16 for p in net.parameters())
            expected = net(he, ihc, mask)
            problem = compiled_mismatch(outputs["logits"], expected["logits"], low_precision)
            if problem is not None:
                _LOG.warning("torch.compile gave wrong answers (%s); predicting with the eager network", problem)
                self.compile_network = False
                return expected
            self._checked_inputs.add(signature)
        return outputs

    def __prepare_scriptable__(self) -> nn.Module:
        """Return the module that ``torch.jit.script`` (used by ``python -m monai.bundle ckpt_export``) compiles in
        place of this one: traces of the 6-channel and 3-channel paths behind a scriptable dispatcher."""
        was_training = self.training
        self.eval()
        c, size = self.in_channels, self.trace_size
        device = next(self.parameters()).device
        gen = torch.Generator().manual_seed(0)
        dual_in = torch.rand(self.trace_batch, 2 * c, size, size, generator=gen).to(device) * 2 - 1
        single_in = torch.rand(self.trace_batch, c, size, size, generator=gen).to(device) * 2 - 1
        is_ihc = (torch.arange(self.trace_batch, device=device) % 2) == 1
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about Python values and shapes are expected: the graphs are checked against eager
            # execution by the bundle tests at other batch sizes and resolutions.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            dual = torch.jit.trace(self, dual_in, check_trace=False)
            single = torch.jit.trace_module(
                self,
                {"forward": single_in, "classify_declared": (single_in, is_ihc), "stain_probabilities": single_in},
                check_trace=False,
            )
        self.train(was_training)
        trust = self.trust
        thresholds = [trust.refer_threshold(s) for s in range(len(SCENARIOS))]
        provenance = json.dumps(self.provenance)  # a string: plain data outside the traced graphs
        normalization = json.dumps((getattr(self.net, "metadata", None) or {}).get(NORMALIZATION_RECORD_KEY))
        return _TracedDeploy(
            dual, single, c, size, self.temperature, trust.calibrated, thresholds, provenance, normalization
        )
