"""Running an ONNX export (:mod:`her2_monai.inference.onnx_export`) with ONNX Runtime behind the deployed model.

:class:`OnnxNetwork` stands in for the trained classifier inside :class:`~her2_monai.inference.deploy.HER2Deploy`: it
has the attributes the deployed model reads (``selector``, ``cmgan``, ``metadata``, ``in_channels``) and answers
:meth:`OnnxNetwork.forward_available` with ONNX Runtime sessions. Routing, calibration, the out-of-distribution
score of the stain and texture statistics, referral and the JSON answer are therefore the deployed model's and the
predictor's own code, not a copy: :func:`load_onnx_predictor` returns an ordinary
:class:`~her2_monai.inference.predictor.HER2Predictor`.

Not available with ONNX Runtime: MC-dropout passes (the head's dropout is not in the graph), out-of-distribution
scores of the classifier's stage statistics (they hook its modules) and class activation maps (they take gradients).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from her2_monai.calibration.ood_features import needs_stage_statistics
from her2_monai.calibration.scorer import TrustScorer
from her2_monai.stain_batch import scenario_ids

__all__ = [
    "OnnxGraph",
    "OpenVinoGraph",
    "OnnxCMGAN",
    "OnnxNetwork",
    "RUNTIMES",
    "check_runtime",
    "require_onnxruntime",
    "require_openvino",
    "read_manifest",
    "load_onnx_predictor",
]

_INSTALL = "pip install 'her2-monai[onnx]' (onnx, onnxscript, onnxruntime)"
#: The runtimes an export can be run with: ONNX Runtime (fp32) and OpenVINO (bf16 where the CPU has bf16 hardware).
RUNTIMES = ("onnxruntime", "openvino")


def check_runtime(runtime: str, onnx: str | os.PathLike | None) -> bool:
    """Validate the ``--runtime``/``--onnx`` options of ``predict`` and ``wsi``.

    Args:
        runtime: ``torch`` or one of :data:`RUNTIMES`.
        onnx: the ``--onnx`` export folder, if given.

    Returns:
        Whether an export runtime (not torch) is asked for.

    Raises:
        ValueError: for an unknown runtime, or an export folder given with ``--runtime torch``.
    """
    if runtime not in ("torch", *RUNTIMES):
        raise ValueError(f"--runtime must be torch, onnxruntime or openvino, got '{runtime}'")
    if onnx is not None and runtime == "torch":
        raise ValueError("--onnx names an ONNX export: add --runtime onnxruntime (or openvino)")
    return runtime != "torch"


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module.

    Raises:
        ImportError: saying how to install it, when it is missing.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"ONNX Runtime is not installed: {_INSTALL}") from err
    return onnxruntime


def require_openvino() -> Any:
    """The ``openvino`` module.

    Raises:
        ImportError: saying how to install it, when it is missing.
    """
    try:
        import openvino
    except ImportError as err:
        raise ImportError("OpenVINO is not installed: pip install 'her2-monai[openvino]'") from err
    return openvino


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder.

    Args:
        folder: the folder written by :func:`~her2_monai.inference.onnx_export.export_onnx`.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: if the folder is missing.
        ValueError: naming the folder, if it is not an ONNX export of this bundle or a graph file is missing.
    """
    from her2_monai.inference.onnx_export import EXPORT_FORMAT, MANIFEST

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"ONNX export '{folder}' not found; write one with python -m her2_monai export --format onnx"
        )
    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise ValueError(
            f"'{folder}' is not an ONNX export of this bundle (expected a folder holding {MANIFEST} and the .onnx "
            "graphs, as written by python -m her2_monai export --format onnx)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"'{path}' is not the manifest of an ONNX export of this bundle (format != {EXPORT_FORMAT})")
    for name, graph in manifest.get("graphs", {}).items():
        if not (folder / graph["file"]).is_file():
            raise ValueError(f"ONNX export '{folder}' is incomplete: the {name} graph '{graph['file']}' is missing")
    if "classifier" not in manifest.get("graphs", {}):
        raise ValueError(f"ONNX export '{folder}' has no classifier graph")
    return manifest


class OnnxGraph:
    """One exported graph in an ONNX Runtime session, called with and returning torch tensors.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: torch's, so both runtimes use the same cores).
        providers: ONNX Runtime execution providers (default: the CPU's).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as err:  # noqa: BLE001  (ORT raises its own exception types)
            raise ValueError(f"'{path}' is not a loadable ONNX graph ({str(err).splitlines()[0][:200]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, *inputs: Tensor, names: Sequence[str] | None = None) -> tuple[Tensor, ...]:
        """Run the graph.

        Args:
            inputs: tensors in the order of ``names``.
            names: the input names (default: the graph's, in order). An input the graph does not declare (e.g.
                ``available`` of a CM-GAN classifier, which the exporter drops as unused) is not fed.

        Returns:
            The outputs as float32 tensors on the first input's device.
        """
        names = list(names or self.input_names)
        feed = {
            n: np.ascontiguousarray(x.detach().float().cpu().numpy())
            for n, x in zip(names, inputs)
            if n in self.input_names
        }
        device = inputs[0].device
        return tuple(torch.from_numpy(o).to(device) for o in self._infer(feed))

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs, in :attr:`output_names` order, for the named input arrays."""
        return self.session.run(self.output_names, feed)


class OpenVinoGraph(OnnxGraph):
    """One exported graph compiled by OpenVINO for the CPU, with :class:`OnnxGraph`'s interface.

    OpenVINO runs the graph in bf16 where :func:`~her2_monai.runtime.execution_settings` picks bf16 for the CPU (bf16
    hardware, ``HER2_CPU_PRECISION`` not ``fp32``), else in fp32; ``docs/performance.md`` has its speed against the
    eager and compiled torch paths.

    Args:
        path: the ``.onnx`` file.
        threads: inference threads (default: torch's, so both use the same cores).
        bf16: bf16 inference precision (default: as :func:`~her2_monai.runtime.execution_settings` decides).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, bf16: bool | None = None):
        from her2_monai.runtime import execution_settings

        openvino = require_openvino()
        self.bf16 = execution_settings("cpu").amp if bf16 is None else bool(bf16)
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if self.bf16 else "f32",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self.compiled = openvino.Core().compile_model(str(path), "CPU", config)
        except Exception as err:  # noqa: BLE001  (OpenVINO raises its own exception types)
            raise ValueError(f"'{path}' is not a graph OpenVINO can load ({str(err).splitlines()[0][:200]})") from None
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feed)
        # Copies: the request reuses its output buffers on the next call.
        return [np.array(results[self.compiled.output(name)]) for name in self.output_names]


class _GraphModule(nn.Module):
    """An :class:`OnnxGraph` with one output, callable like the torch module it replaces."""

    def __init__(self, graph: OnnxGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> the graph's single output."""
        return self.graph.run(image)[0]


class OnnxCMGAN(nn.Module):
    """The two exported CM-GAN generators, with the attribute names of
    :class:`~her2_monai.networks.cmgan.CrossModalGAN` (``he_to_ihc``, ``ihc_to_he``)."""

    def __init__(self, he_to_ihc: OnnxGraph, ihc_to_he: OnnxGraph) -> None:
        super().__init__()
        self.he_to_ihc = _GraphModule(he_to_ihc)
        self.ihc_to_he = _GraphModule(ihc_to_he)

    def synthesize(self, he: Tensor, ihc: Tensor, available: Tensor) -> tuple[Tensor, Tensor]:
        """Fill each sample's missing stain with its generator, run only on the samples that need it.

        Args:
            he: ``(B, 3, S, S)``.
            ihc: ``(B, 3, S, S)``.
            available: ``(B, 2)`` bool.

        Returns:
            ``(he_filled, ihc_filled)``.
        """
        he, ihc = he.clone(), ihc.clone()
        need_he = (~available[:, 0]).nonzero().flatten()
        need_ihc = (~available[:, 1]).nonzero().flatten()
        # Both sources are read before either output changes: a generated stain never feeds a generator.
        fake_he = self.ihc_to_he(ihc.index_select(0, need_he)) if need_he.numel() else None
        fake_ihc = self.he_to_ihc(he.index_select(0, need_ihc)) if need_ihc.numel() else None
        if fake_he is not None:
            he[need_he] = fake_he.to(he.dtype)
        if fake_ihc is not None:
            ihc[need_ihc] = fake_ihc.to(ihc.dtype)
        return he, ihc


class OnnxNetwork(nn.Module):
    """The exported model in ONNX Runtime, in place of the classifier inside
    :class:`~her2_monai.inference.deploy.HER2Deploy` (see the module docstring).

    Args:
        folder: the export folder.
        threads: intra-op threads of the runtime (default: torch's).
        providers: ONNX Runtime execution providers (default: the CPU's).
        runtime: ``onnxruntime`` or ``openvino`` (:data:`RUNTIMES`).

    Raises:
        FileNotFoundError: if the folder is missing.
        ValueError: if it is not a complete export of this bundle, or for an unknown runtime.
        ImportError: without the runtime's package.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        runtime: str = "onnxruntime",
    ) -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got '{runtime}'")
        if runtime == "openvino":
            require_openvino()
        else:
            require_onnxruntime()
        self.runtime = runtime
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.metadata: dict[str, Any] = dict(self.manifest.get("model_metadata") or {})
        self.in_channels = int(self.manifest["in_channels"])
        self.image_size = int(self.manifest["image_size"])
        self.missing_strategy = str(self.manifest["missing_strategy"])
        self.channels_last = False
        self.graphs = {
            name: OpenVinoGraph(self.folder / spec["file"], threads)
            if runtime == "openvino"
            else OnnxGraph(self.folder / spec["file"], threads, providers)
            for name, spec in self.manifest["graphs"].items()
        }
        self.selector = _GraphModule(self.graphs["selector"]) if "selector" in self.graphs else None
        self.cmgan = None
        if "he_to_ihc" in self.graphs and "ihc_to_he" in self.graphs:
            self.cmgan = OnnxCMGAN(self.graphs["he_to_ihc"], self.graphs["ihc_to_he"])
        elif self.missing_strategy == "cmgan":
            raise ValueError(f"ONNX export '{self.folder}' of a CM-GAN model lacks the generator graphs")
        calibration = self.metadata.get("calibration")
        if needs_stage_statistics(TrustScorer(calibration).ood_inputs if calibration else ()):
            raise ValueError(
                f"the model of '{self.folder}' scores out-of-distribution inputs on the classifier's stage statistics, "
                "which the ONNX graphs do not give; predict with the bundle (--runtime torch)"
            )

    def _check_size(self, image: Tensor) -> None:
        if image.ndim != 4 or tuple(image.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"the ONNX export takes (B, {self.in_channels}, {self.image_size}, {self.image_size}) images (the "
                f"model's image size), got {tuple(image.shape)}"
            )

    def forward_available(
        self, he: Tensor, ihc: Tensor, available: Tensor, all_available: bool = False
    ) -> dict[str, Tensor]:
        """The classifier's outputs that the deployed model reads.

        Args:
            he: ``(B, 3, S, S)``.
            ihc: ``(B, 3, S, S)``.
            available: ``(B, 2)`` bool availability.
            all_available: every stain is present (no generator runs).

        Returns:
            ``logits`` ``(B, K)`` (raw), ``scenario`` ``(B,)``, ``embedding``, ``stain_attention`` ``(B, 2)``,
            ``he_input`` and ``ihc_input`` (the images the classifier was given).
        """
        self._check_size(he)
        self._check_size(ihc)
        available = available.bool()
        if self.cmgan is not None and not all_available:
            he, ihc = self.cmgan.synthesize(he, ihc, available)
        logits, embedding, attention = self.graphs["classifier"].run(
            he, ihc, available.float(), names=("he", "ihc", "available")
        )
        return {
            "logits": logits,
            "scenario": scenario_ids(available),
            "embedding": embedding,
            "stain_attention": attention,
            "he_input": he,
            "ihc_input": ihc,
        }

    def forward(self, he: Tensor, ihc: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """As :meth:`~her2_monai.networks.her2net.HER2FlexibleNet.forward`, for the outputs listed in
        :meth:`forward_available`."""
        from her2_monai.stain_batch import check_stain_inputs

        he, ihc, available = check_stain_inputs(he, ihc, mask, self.in_channels)
        return self.forward_available(he, ihc, available)


def _min_tissue_fraction(configured: Any, metadata: dict[str, Any], folder: str | os.PathLike) -> float:
    """The configured tissue threshold, else the one recorded with the model, else the bundle's default."""
    from her2_monai.transforms.tissue import MIN_TISSUE_FRACTION

    value = configured if configured is not None else metadata.get("min_tissue_fraction", MIN_TISSUE_FRACTION)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"min_tissue_fraction must be a number in [0, 1] (configured or in '{folder}'), got {value!r}")
    return number


def load_onnx_predictor(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    refer_threshold: float | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    runtime: str = "onnxruntime",
    **overrides: Any,
):
    """A :class:`~her2_monai.inference.predictor.HER2Predictor` that runs an ONNX export with ONNX Runtime or OpenVINO.

    The preprocessing is the inference config stored in the export, with the model's image size, tissue threshold
    and stain normalisation taken from the export's own record (no model file is read).

    Args:
        folder: the export folder.
        device: where the torch parts (preprocessing, statistics) run; ONNX Runtime runs on the CPU.
        refer_threshold: confidence below which a case is referred (``None``: the thresholds recorded with the model).
        batch_size: records per forward pass (``None``: :func:`~her2_monai.inference.batching.auto_batch_size` of the
            export's image size).
        threads: the runtime's intra-op threads.
        runtime: ``onnxruntime`` (fp32) or ``openvino`` (bf16 where the CPU has bf16 hardware, else fp32).
        overrides: further inference-config values (e.g. ``min_tissue_fraction``).

    Returns:
        The predictor (torch's mixed precision off: the runtime picks its own precision).

    Raises:
        FileNotFoundError: if the folder is missing.
        ValueError: if it is not an export of this bundle, holds no inference config, or for an unknown runtime.
        ImportError: without the runtime's package.
    """
    from monai.bundle import ConfigParser

    from her2_monai.inference.batching import auto_batch_size
    from her2_monai.inference.deploy import HER2Deploy
    from her2_monai.inference.predictor import HER2Predictor
    from her2_monai.transforms.stain_settings import references_from_record

    if overrides.get("mc_dropout_passes"):
        raise ValueError("--mc_dropout_passes needs the bundle's model (the head's dropout is not exported)")
    overrides.pop("mc_dropout_passes", None)
    network = OnnxNetwork(folder, threads, runtime=runtime)
    config = network.manifest.get("inference_config")
    if not isinstance(config, dict) or "preprocessing" not in config:
        raise ValueError(f"ONNX export '{folder}' holds no inference config; export it again with --config_file")
    parser = ConfigParser(config)
    parser.update(overrides)
    stain = [parser.get_parsed_content(k) for k in ("stain_normalization", "stain_reference", "stain_reference_ihc")]
    parser.update(
        {
            "model_image_size": network.image_size,
            "stain_references": references_from_record(network.manifest.get("stain_normalization"), *stain),
            "model_min_tissue_fraction": _min_tissue_fraction(
                parser.get_parsed_content("min_tissue_fraction"), network.metadata, folder
            ),
        }
    )
    return HER2Predictor(
        network=HER2Deploy(network).eval(),
        preprocessing=parser.get_parsed_content("preprocessing"),
        postprocessing=parser.get_parsed_content("postprocessing"),
        device=device,
        refer_threshold=refer_threshold,
        amp=False,
        batch_size=auto_batch_size(network.image_size) if batch_size is None else batch_size,
    )
