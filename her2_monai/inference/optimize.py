"""Inference-only rewrites of a trained classifier: BatchNorm folding and bf16 islands (``docs/performance.md``).

The profile of the deployed path under bf16 autocast on a CPU with bf16 hardware showed where the time went: each
BatchNorm ran as a separate pass over the activations (in bf16 with float32 statistics), and every reflection-padded
convolution of the CM-GAN generators made a float32 round trip, because CPU autocast runs ``reflection_pad2d`` in
float32 (a cast to float32, the padding, and a cast back to bf16 for the convolution), and the frozen weights were
cast to bf16 again on every call (autocast caches only weights that require gradients). Two rewrites remove that:

* :func:`fold_batchnorm`: every eval-mode ``BatchNorm2d`` whose input is the output of a ``Conv2d`` or
  ``ConvTranspose2d`` used by nothing else is folded into that convolution
  (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`) and replaced by ``nn.Identity``. Exact up to rounding in float32.
  The pairs are found on a ``torch.fx`` graph, so a convolution whose output also feeds a residual is left alone.
* :func:`make_bf16_island`: the weights of a convolution-heavy module (a generator, an encoder trunk) are cast to
  bf16 and channels-last once, and its input is cast to bf16 channels-last on entry and its output back to the
  caller's dtype on exit, so everything inside, padding included, runs in bf16.

:func:`optimize_for_inference` applies both to a copy of a :class:`~her2_monai.networks.her2net.HER2FlexibleNet`
(the original, its state dict and exports are untouched). The module keeps its classes and attributes (the surgery
replaces submodules in place), so code that reads ``encoder.shared.stages`` or ``cmgan.he_to_ihc`` still works.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "OPTIMIZE_ENV",
    "inference_optimization",
    "conv_bn_pairs",
    "fold_batchnorm",
    "make_bf16_island",
    "optimize_for_inference",
]

_LOG = logging.getLogger(__name__)

#: Environment variable turning the inference rewrites off (``off``) or on (``auto``, the default).
OPTIMIZE_ENV = "HER2_INFERENCE_OPTIMIZE"
_CHOICES = {"auto": True, "on": True, "1": True, "true": True, "off": False, "0": False, "false": False}
_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def inference_optimization(value: bool | str | None = None) -> bool:
    """Whether the deployed path optimises its network: ``value`` if given, else ``$HER2_INFERENCE_OPTIMIZE``.

    Args:
        value: ``True``/``False`` or one of ``auto``, ``on``, ``off`` (and ``1``/``0``, ``true``/``false``);
            ``None`` reads the environment variable (unset: ``auto``).

    Returns:
        ``True`` unless switched off.

    Raises:
        ValueError: naming the variable, for any other value.
    """
    if isinstance(value, bool):
        return value
    text = (os.environ.get(OPTIMIZE_ENV, "auto") if value is None else str(value)).strip().lower() or "auto"
    if text not in _CHOICES:
        raise ValueError(f"{OPTIMIZE_ENV}={text!r} is not one of auto, on, off")
    return _CHOICES[text]


def conv_bn_pairs(module: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """Qualified names of the ``(convolution, BatchNorm2d)`` pairs of ``module`` that can be folded.

    ``module`` is traced with ``torch.fx``; a module that cannot be traced is searched child by child instead. A pair
    is a ``BatchNorm2d`` call whose only input is a ``Conv2d``/``ConvTranspose2d`` call with no other user.

    Args:
        module: the network.
        prefix: qualified name of ``module`` in the network it belongs to.

    Returns:
        ``(conv name, bn name)`` pairs, qualified from the network's root.
    """
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001  (any tracing failure: search the children, which usually trace)
        pairs: list[tuple[str, str]] = []
        for name, child in module.named_children():
            pairs += conv_bn_pairs(child, f"{prefix}{name}.")
        return pairs
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), _CONVS)
            and len(source.users) == 1
        ):
            pairs.append((prefix + source.target, prefix + node.target))
    return pairs


def _set_submodule(root: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, value)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each foldable eval-mode BatchNorm of ``module`` into its convolution, in place (see the module docstring).

    A BatchNorm in training mode or without running statistics is left alone, as is a convolution module called
    more than once (the graph would show it with several users of one name).

    Args:
        module: the network, in eval mode.

    Returns:
        The number of BatchNorms folded.
    """
    pairs = conv_bn_pairs(module)
    convs = [conv for conv, _ in pairs]
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        if bn.training or bn.running_mean is None or convs.count(conv_name) > 1:
            continue
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
        fused.requires_grad_(False)
        _set_submodule(module, conv_name, fused)
        _set_submodule(module, bn_name, nn.Identity())
        folded += 1
    return folded


def _to_bf16(module: nn.Module, args: tuple) -> tuple:
    return tuple(
        a.to(torch.bfloat16, memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.ndim == 4 else a
        for a in args
    )


def make_bf16_island(module: nn.Module, output_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Run ``module`` in bf16 and channels-last from its input to its output, in place.

    Args:
        module: a convolutional module taking 4-D image tensors (it must not hold float32-only statistics).
        output_dtype: dtype its tensor output is cast back to.

    Returns:
        ``module``, its parameters and buffers in bf16, with a forward pre-hook casting 4-D inputs to bf16
        channels-last and a forward hook casting a tensor output to ``output_dtype``.
    """
    module.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def back(_: nn.Module, __: tuple, output: object) -> object:
        return output.to(output_dtype) if isinstance(output, torch.Tensor) else output

    module.register_forward_pre_hook(_to_bf16)
    module.register_forward_hook(back)
    return module


def _islands(net: nn.Module) -> list[nn.Module]:
    """The convolution-heavy parts of a HER2 classifier: the CM-GAN generators and the encoder trunks."""
    parts: list[nn.Module] = []
    cmgan = getattr(net, "cmgan", None)
    if cmgan is not None:
        parts += [getattr(cmgan, name) for name in ("he_to_ihc", "ihc_to_he") if hasattr(cmgan, name)]
    encoder = getattr(net, "encoder", None)
    if encoder is not None:
        parts += [encoder.shared, *encoder.specific.values()]
    return parts


def optimize_for_inference(net: nn.Module, bf16: bool) -> nn.Module:
    """A copy of ``net`` for eval-mode inference: BatchNorm folded, and with ``bf16`` the heavy parts in bf16.

    Args:
        net: the trained classifier (left unchanged).
        bf16: run the CM-GAN generators and the encoder trunks as bf16 islands (:func:`make_bf16_island`); the
            branch selector, fusion, attention and head keep their float32 weights (autocast still applies there).

    Returns:
        The optimised copy, in eval mode, with no parameter requiring gradients.
    """
    fast = copy.deepcopy(net).eval().requires_grad_(False)
    folded = fold_batchnorm(fast)
    islands = _islands(fast) if bf16 else []
    for part in islands:
        make_bf16_island(part)
    _LOG.info("inference network: %d BatchNorms folded, %d bf16 islands", folded, len(islands))
    return fast
