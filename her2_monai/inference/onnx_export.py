"""ONNX export of the deployed model: a documented set of graphs and a manifest, checked against eager fp32.

The deployed model routes each image by the branch selector and fills a missing stain with a CM-GAN generator before
the classifier runs; those steps depend on the data, so they stay in Python (the small runner of
:mod:`her2_monai.inference.onnx_runtime`) and each network becomes one ONNX graph with a dynamic batch:

============== =================================================== =========================================
file           inputs                                              outputs
============== =================================================== =========================================
selector.onnx  ``image`` ``(B, 3, S, S)``                          ``logits`` ``(B, 2)`` (H&E, IHC)
he_to_ihc.onnx ``image`` ``(B, 3, S, S)`` H&E                      ``translated`` ``(B, 3, S, S)`` IHC
ihc_to_he.onnx ``image`` ``(B, 3, S, S)`` IHC                      ``translated`` ``(B, 3, S, S)`` H&E
classifier.onnx ``he``, ``ihc`` ``(B, 3, S, S)``, ``available``    ``logits`` ``(B, 4)`` (raw, before the
               ``(B, 2)`` float 0/1                                temperature), ``embedding``, ``stain_attention``
============== =================================================== =========================================

Images are RGB scaled to ``[-1, 1]`` at the model's image size ``S``. A model without a selector or a CM-GAN has no
such file. The classifier of a CM-GAN model takes both images already filled (``available`` is then unused).

``export.json`` beside the graphs is the manifest: the model's metadata record (calibration temperature, referral and
out-of-distribution thresholds and statistics, stain-normalisation record, provenance, image size), the class names,
the inference config and bundle metadata the export was made with, each graph's inputs and outputs, and the check
against the eager fp32 model (largest absolute difference per graph). The folder is written under a temporary name
and renamed into place only after the check passed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from her2_monai.constants import CLASS_NAMES, SCENARIOS
from her2_monai.fileio import replace_folder, write_json_atomic
from her2_monai.inference.deploy import HER2Deploy
from her2_monai.transforms.stain_settings import RECORD_KEY as NORMALIZATION_RECORD_KEY

__all__ = [
    "EXPORT_FORMAT",
    "MANIFEST",
    "ONNX_TOLERANCE",
    "OnnxExportError",
    "export_onnx",
    "export_deploy",
    "export_graphs",
]

#: ``format`` value of the manifest, and its version.
EXPORT_FORMAT = "her2-monai-onnx"
EXPORT_VERSION = 1
#: The manifest's file name inside the export folder.
MANIFEST = "export.json"
#: Largest accepted absolute difference between ONNX Runtime and eager fp32 outputs (logits, images in ``[-1, 1]``).
#: Both run fp32 with different kernels and summation orders; on the networks of this project the difference is
#: 1e-6 to 1e-5. A logit difference of 1e-3 moves a softmax probability by at most 5e-4, so a call changes only for
#: a case within 5e-4 of a tie or of a referral threshold, while a wrong export (a dropped layer, train-mode
#: normalisation, a wrong weight) differs by 1e-1 or more.
ONNX_TOLERANCE = 1e-3

_LOG = logging.getLogger(__name__)
_NOT_AN_EXPORT = "'{}' exists and is not an ONNX export of this bundle; choose another --output"


class OnnxExportError(ValueError):
    """The ONNX graphs do not reproduce the eager model (or could not be made)."""


class _SelectorGraph(nn.Module):
    """The branch selector's logits for one image of either stain."""

    def __init__(self, selector: nn.Module) -> None:
        super().__init__()
        self.selector = selector

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> ``(B, 2)`` logits (H&E, IHC)."""
        return self.selector(image).float()


class _ClassifierGraph(nn.Module):
    """The classifier on two images and their availability (missing stains already filled for a CM-GAN model)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.filled = net.missing_strategy == "cmgan"

    def forward(self, he: Tensor, ihc: Tensor, available: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, 3, S, S)`` twice and ``(B, 2)`` float -> logits ``(B, K)``, embedding, stain attention ``(B, 2)``."""
        out = self.net.forward_available(he, ihc, available > 0.5, all_available=self.filled)
        return out["logits"].float(), out["embedding"].float(), out["stain_attention"].float()


def _graph_specs(net: nn.Module) -> dict[str, tuple[nn.Module, tuple[str, ...], tuple[str, ...]]]:
    """The modules to export, with their input and output names."""
    specs: dict[str, tuple[nn.Module, tuple[str, ...], tuple[str, ...]]] = {}
    if getattr(net, "selector", None) is not None:
        specs["selector"] = (_SelectorGraph(net.selector), ("image",), ("logits",))
    if getattr(net, "cmgan", None) is not None and net.missing_strategy == "cmgan":
        specs["he_to_ihc"] = (net.cmgan.he_to_ihc, ("image",), ("translated",))
        specs["ihc_to_he"] = (net.cmgan.ihc_to_he, ("image",), ("translated",))
    outputs = ("logits", "embedding", "stain_attention")
    specs["classifier"] = (_ClassifierGraph(net), ("he", "ihc", "available"), outputs)
    return specs


def _example_inputs(names: tuple[str, ...], batch: int, channels: int, size: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for name in names:
        if name == "available":
            inputs.append(torch.ones(batch, 2))
        else:
            inputs.append(torch.rand(batch, channels, size, size, generator=gen) * 2 - 1)
    return tuple(inputs)


def export_graphs(net: nn.Module, folder: Path, image_size: int, opset: int | None = None) -> dict[str, dict]:
    """Write one ONNX graph per network of ``net`` into ``folder`` (dynamic batch, fixed image size).

    Args:
        net: the fp32 classifier in eval mode (:class:`~her2_monai.networks.her2net.HER2FlexibleNet`).
        folder: an existing folder.
        image_size: side in pixels of the inputs (the model's image size).
        opset: ONNX opset (default: the exporter's).

    Returns:
        Per graph name: ``file``, ``inputs`` and ``outputs`` (names).

    Raises:
        OnnxExportError: if a network cannot be exported.
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    graphs = {}
    for name, (module, inputs, outputs) in _graph_specs(net).items():
        example = _example_inputs(inputs, 2, net.in_channels, image_size)
        path = folder / f"{name}.onnx"
        progress = io.StringIO()  # the exporter prints its steps; kept for the debug log
        try:
            with torch.no_grad(), contextlib.redirect_stdout(progress):
                program = torch.onnx.export(
                    module.eval(),
                    example,
                    dynamo=True,
                    input_names=list(inputs),
                    output_names=list(outputs),
                    dynamic_shapes=tuple({0: batch} for _ in inputs),
                    opset_version=opset,
                    verbose=False,
                )
        except Exception as err:  # noqa: BLE001  (the exporter raises many types; the user needs the graph's name)
            raise OnnxExportError(f"could not export the {name} graph to ONNX: {type(err).__name__}: {err}") from err
        _LOG.debug("ONNX export of the %s graph:\n%s", name, progress.getvalue())
        program.model.metadata_props.update({"her2_monai.graph": name, "her2_monai.manifest": MANIFEST})
        program.save(str(path))
        graphs[name] = {"file": path.name, "inputs": list(inputs), "outputs": list(outputs)}
    return graphs


def _check_against_eager(deploy: HER2Deploy, folder: Path, batch: int, tolerance: float) -> dict[str, float]:
    """The largest absolute difference of each ONNX Runtime graph, and of the calibrated logits of the whole runner
    for dual and single-stain inputs, from the eager fp32 model."""
    from her2_monai.inference.onnx_runtime import OnnxNetwork

    runner = OnnxNetwork(folder)
    net, size = deploy.net, int(runner.image_size)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        for name, (module, inputs, _) in _graph_specs(net).items():
            example = _example_inputs(inputs, batch, net.in_channels, size)
            expected = module(*example)
            found = runner.graphs[name].run(*example)
            expected = expected if isinstance(expected, tuple) else (expected,)
            diffs[name] = max(float((e.float() - f).abs().max()) for e, f in zip(expected, found))
        runtime_deploy = HER2Deploy(runner).eval()
        gen = torch.Generator().manual_seed(1)
        for label, channels in (("deployed_dual", 2 * net.in_channels), ("deployed_single", net.in_channels)):
            x = torch.rand(batch, channels, size, size, generator=gen) * 2 - 1
            diffs[label] = float((runtime_deploy(x) - deploy(x)).abs().max())
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}  # NaN fails too
    if bad:
        found = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
        raise OnnxExportError(
            f"the ONNX graphs do not reproduce the eager fp32 model: max abs diff {found} > {tolerance:g}; the export "
            "was not written"
        )
    return diffs


def _manifest(deploy: HER2Deploy, graphs: dict, diffs: Mapping[str, float], tolerance: float, extra: Mapping) -> dict:
    net = deploy.net
    metadata = dict(getattr(net, "metadata", None) or {})
    trust = deploy.trust
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "class_names": list(CLASS_NAMES),
        "scenarios": list(SCENARIOS),
        "in_channels": int(net.in_channels),
        "image_size": int(metadata.get("image_size") or deploy.trace_size),
        "missing_strategy": str(net.missing_strategy),
        "temperature": float(trust.temperature),
        "calibrated": bool(trust.calibrated),
        "refer_thresholds": {s: trust.refer_threshold(i) for i, s in enumerate(SCENARIOS)},
        "provenance": deploy.provenance,
        "stain_normalization": metadata.get(NORMALIZATION_RECORD_KEY),
        "model_metadata": metadata,
        "graphs": graphs,
        "check": {"reference": "eager fp32", "max_abs_diff": dict(diffs), "tolerance": tolerance},
        "torch_version": torch.__version__,
        **extra,
    }


def _read_json(path: str | os.PathLike | None) -> Any:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found")
    return json.loads(path.read_text())


def _swap_into_place(staging: Path, output: Path) -> None:
    """Rename the finished folder to ``output``, replacing an earlier export there (never anything else)."""
    if output.exists() and not (output / MANIFEST).is_file():
        raise FileExistsError(_NOT_AN_EXPORT.format(output))
    replace_folder(staging, output)


def export_deploy(
    deploy: HER2Deploy,
    output: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    tolerance: float = ONNX_TOLERANCE,
    check_batch: int = 3,
    opset: int | None = None,
) -> dict[str, Any]:
    """Export a deployed model (fp32, eval mode) as ONNX graphs with their manifest, checked against it.

    Args:
        deploy: the deployed model; it is the reference of the check, so give it fp32 contiguous weights.
        output: the export folder to write (replaced if it holds an earlier export).
        extra: further manifest entries (the inference config and bundle metadata).
        tolerance: largest accepted absolute difference from ``deploy`` (see :data:`ONNX_TOLERANCE`).
        check_batch: batch size of the check.
        opset: ONNX opset (default: the exporter's).

    Returns:
        The manifest written.

    Raises:
        FileExistsError: if ``output`` exists and is not an earlier export.
        OnnxExportError: if a graph cannot be exported or differs from ``deploy`` by more than ``tolerance``.
        ImportError: without the ``onnx`` extra.
    """
    from her2_monai.inference.onnx_runtime import require_onnxruntime

    require_onnxruntime()
    output = Path(output)
    if output.exists() and not (output / MANIFEST).is_file():
        raise FileExistsError(_NOT_AN_EXPORT.format(output))
    size = int(deploy.net.metadata.get("image_size") or deploy.trace_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        graphs = export_graphs(deploy.net, staging, size, opset)
        # The runner reads the manifest: write it first without the check, then again with it.
        write_json_atomic(_manifest(deploy, graphs, {}, tolerance, extra or {}), staging / MANIFEST)
        diffs = _check_against_eager(deploy, staging, check_batch, tolerance)
        manifest = _manifest(deploy, graphs, diffs, tolerance, extra or {})
        write_json_atomic(manifest, staging / MANIFEST)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the export from a serving account
        _swap_into_place(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def export_onnx(
    model_file: str | os.PathLike,
    output: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    meta_file: str | os.PathLike | None = None,
    tolerance: float = ONNX_TOLERANCE,
    check_batch: int = 3,
    opset: int | None = None,
) -> dict[str, Any]:
    """Export the trained model as ONNX graphs with their manifest, checked against the eager fp32 model.

    Args:
        model_file: the trained ``models/model.pt``.
        output: the export folder to write (replaced if it holds an earlier export).
        config_file: the inference config stored in the manifest (its preprocessing is used at prediction).
        meta_file: the bundle's ``metadata.json``, stored in the manifest.
        tolerance: largest accepted absolute difference from eager fp32 (see :data:`ONNX_TOLERANCE`).
        check_batch: batch size of the check (another size than the export's example batch of 2).
        opset: ONNX opset (default: the exporter's).

    Returns:
        The manifest written (``check.max_abs_diff`` holds the differences).

    Raises:
        FileNotFoundError: for a missing model, config or metadata file.
        FileExistsError: if ``output`` exists and is not an earlier export.
        OnnxExportError: if a graph cannot be exported or differs from eager fp32 by more than ``tolerance``.
        ImportError: without the ``onnx`` extra (``onnx``, ``onnxscript``, ``onnxruntime``).
    """
    output = Path(output)
    if output.exists() and not (output / MANIFEST).is_file():
        raise FileExistsError(_NOT_AN_EXPORT.format(output))
    extra = {"inference_config": _read_json(config_file), "bundle_metadata": _read_json(meta_file)}
    # fp32, contiguous tensors, no autocast: the reference the graphs are checked against.
    deploy = HER2Deploy.from_model_file(model_file, channels_last=False).float().eval()
    manifest = export_deploy(deploy, output, extra, tolerance, check_batch, opset)
    return manifest
