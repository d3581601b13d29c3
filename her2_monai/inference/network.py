"""The bundle's deployment network: loads the standard ``models/model.pt`` and exports to one TorchScript file."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from her2_monai.networks.her2net import HER2DeployNet, HER2FlexibleNet

__all__ = [
    "TRAIN_COMMAND",
    "SELECTOR_COMMAND",
    "HER2BundleNet",
    "TracedDeployDispatcher",
    "load_bundle_weights",
    "BundleWeightsLoader",
]

logger = logging.getLogger(__name__)

#: Command that writes ``models/model.pt`` (and ``models/cmgan.pt``), quoted in missing-file errors.
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundle/configs/train.json"
#: Command that writes ``models/selector.pt``, quoted in missing-file errors.
SELECTOR_COMMAND = "python -m monai.bundle run train_selector --config_file bundle/configs/train.json"

_DEPLOY_PREFIXES = ("net.", "selector.")


class TracedDeployDispatcher(nn.Module):
    """Scriptable front of an exported :class:`HER2BundleNet`: picks the traced graph that fits the channel count.

    A ``torch.jit.trace`` freezes Python branches, so one trace cannot serve both the H&E+IHC (``2C`` channels) and
    the single-stain (``C`` channels, routed by the branch selector) inputs. This module holds one trace of each and
    is itself compiled with ``torch.jit.script``, so the exported file keeps the deploy net's one-tensor contract.

    Args:
        dual: trace of the deploy net on a ``(B, 2C, H, W)`` example.
        single: trace of the deploy net on a ``(B, C, H, W)`` example.
        in_channels: ``C``, channels per stain.
    """

    def __init__(self, dual: nn.Module, single: nn.Module, in_channels: int = 3) -> None:
        super().__init__()
        self.dual = dual
        self.single = single
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` (selector-routed) or ``(B, 2C, H, W)`` (H&E then IHC), in ``[-1, 1]`` -> ``(B, 4)``."""
        if x.dim() != 4:
            raise ValueError("expected a (B, C, H, W) tensor")
        if x.shape[1] == 2 * self.in_channels:
            return self.dual(x)
        if x.shape[1] == self.in_channels:
            return self.single(x)
        raise ValueError("expected 3 channels (one stain, routed by the selector) or 6 channels (H&E then IHC)")


class HER2BundleNet(HER2DeployNet):
    """:class:`~her2_monai.networks.her2net.HER2DeployNet` as the bundle's ``network_def``.

    Two additions make the standard MONAI bundle tools work with the classifier checkpoint that training writes:

    * **Loading.** :meth:`load_state_dict` accepts either the full deploy layout (keys ``net.*`` and ``selector.*``)
      or the classifier-only layout of ``models/model.pt`` (the :class:`HER2FlexibleNet` state dict written by
      stage 2). For the latter the selector is loaded from ``selector_weights`` (``models/selector.pt``) at the same
      moment, so ``ckpt_export``, MONAI Label and :func:`load_bundle_weights` all take ``models/model.pt`` as is.
      Building the module reads no file, so ``verify_net_in_out`` works before training.
    * **Export.** ``torch.jit.script`` (what ``python -m monai.bundle ckpt_export`` calls) cannot compile the
      dict-returning classifier, so :meth:`__prepare_scriptable__` hands it a :class:`TracedDeployDispatcher` holding
      traces of the 6-channel and 3-channel paths, made at ``trace_size`` pixels (any size works afterwards: the
      graphs are fully convolutional; the selector's per-sample routing stays dynamic inside the 3-channel trace).

    Args:
        flexible_net: the HER2 classifier.
        selector: the branch selector, ``(B, C, H, W) -> (B, 2)`` stain logits.
        selector_weights: state-dict file of the selector, read when a classifier-only state dict is loaded.
        trace_size: side in pixels of the example inputs used to trace for TorchScript export.
        trace_batch: batch size of those example inputs.
    """

    def __init__(
        self,
        flexible_net: HER2FlexibleNet,
        selector: nn.Module,
        selector_weights: str | os.PathLike | None = None,
        trace_size: int = 64,
        trace_batch: int = 2,
    ) -> None:
        super().__init__(flexible_net, selector)
        if trace_size < 8 or trace_batch < 1:
            raise ValueError(f"trace_size must be >= 8 and trace_batch >= 1, got {trace_size} and {trace_batch}")
        self.selector_weights = None if selector_weights in (None, "") else str(selector_weights)
        self.trace_size = int(trace_size)
        self.trace_batch = int(trace_batch)

    def load_selector(self, path: str | os.PathLike | None = None) -> HER2BundleNet:
        """Load the branch selector's state dict.

        Args:
            path: state-dict file (default: ``selector_weights``).

        Returns:
            ``self``.

        Raises:
            FileNotFoundError: if no file is configured or it does not exist (naming the command that makes it).
        """
        path = path if path is not None else self.selector_weights
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"branch selector weights not found at '{path}'. The deploy network needs them to tell H&E from IHC; "
                f"create them with: {SELECTOR_COMMAND}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.selector.load_state_dict(state)
        return self

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a full deploy state dict, or a classifier-only one plus the selector file (see the class docstring).

        Args:
            state_dict: deploy layout (``net.*``, ``selector.*``) or :class:`HER2FlexibleNet` layout.
            strict: as in :meth:`torch.nn.Module.load_state_dict`.
            assign: as in :meth:`torch.nn.Module.load_state_dict`.

        Returns:
            The missing and unexpected keys, in the deploy layout.

        Raises:
            FileNotFoundError: for a classifier-only state dict when the selector file is missing.
            RuntimeError: on missing/unexpected keys or shape mismatches (``strict``).
        """
        if any(k.startswith(_DEPLOY_PREFIXES) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.load_selector()
        result = self.net.load_state_dict(state_dict, strict=strict, assign=assign)
        return type(result)([f"net.{k}" for k in result.missing_keys], list(result.unexpected_keys))

    def __prepare_scriptable__(self) -> nn.Module:
        """Return the :class:`TracedDeployDispatcher` that ``torch.jit.script`` compiles in place of this module."""
        was_training = self.training
        self.eval()
        c, size = self.net.in_channels, self.trace_size
        device = next(self.parameters()).device
        gen = torch.Generator().manual_seed(0)
        dual_in = torch.rand(self.trace_batch, 2 * c, size, size, generator=gen).to(device) * 2 - 1
        single_in = torch.rand(self.trace_batch, c, size, size, generator=gen).to(device) * 2 - 1
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about Python values and shapes are expected: both graphs are checked against eager
            # execution by the bundle tests at other batch sizes and resolutions.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            dual = torch.jit.trace(self, dual_in, check_trace=False)
            single = torch.jit.trace(self, single_in, check_trace=False)
        self.train(was_training)
        return TracedDeployDispatcher(dual, single, c)


def load_bundle_weights(network: nn.Module, path: str | os.PathLike, description: str = "") -> nn.Module:
    """Load the trained classifier (``models/model.pt``) into the bundle network, with actionable errors.

    Args:
        network: usually a :class:`HER2BundleNet` (which also loads the selector), or a :class:`HER2FlexibleNet`.
        path: the state-dict file.
        description: how the network was configured (e.g. ``"profile 'demo'"``), quoted in mismatch errors.

    Returns:
        ``network``, in eval mode.

    Raises:
        FileNotFoundError: if the file (or the selector file) is missing, naming the command that creates it.
        ValueError: if the checkpoint does not fit the configured architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trained HER2 classifier not found at '{path}'. Train the bundle first: {TRAIN_COMMAND}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' is not a state dict of tensors (expected the file written by training)")
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()
        summary = " ".join(line.strip() for line in detail[:3])
        where = f" ({description})" if description else ""
        raise ValueError(
            f"'{path}' does not fit the network configured for inference{where}: {summary[:400]} ... Use the same "
            "profile and architecture overrides as in training (e.g. --profile bci for a model trained with "
            "--dataset_dir)."
        ) from None
    logger.info("loaded %s", path)
    return network.eval()


class BundleWeightsLoader:
    """Ignite handler: load the trained weights into the network when the engine starts (inference workflow).

    Loading at run time, not when the config is parsed, lets MONAI build the workflow (property checks, MONAI Label)
    before any weights exist; the errors are those of :func:`load_bundle_weights`.

    Args:
        load_path: ``models/model.pt``.
        network: the network to fill (a :class:`HER2BundleNet` also loads its selector).
        description: how the network was configured, quoted in mismatch errors.
    """

    def __init__(self, load_path: str | os.PathLike, network: nn.Module, description: str = "") -> None:
        self.load_path = load_path
        self.network = network
        self.description = description

    def attach(self, engine: Engine) -> None:
        """Run :meth:`__call__` once, when the engine starts."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        load_bundle_weights(self.network, self.load_path, self.description)
