"""Model files: reading the weights the bundle writes and rebuilding networks from the architecture they record.

The bundle writes three weight files, each the state dict of a
:class:`~her2_monai.networks.record.RecordedNetwork`, so each also holds its network's constructor arguments:

* ``models/selector.pt``: the :class:`~her2_monai.networks.selector.BranchSelector` (``run train_selector``);
* ``models/cmgan.pt``: the :class:`~her2_monai.networks.cmgan.CrossModalGAN` generators (``run train_gan``);
* ``models/model.pt``: the :class:`~her2_monai.networks.her2net.HER2FlexibleNet` with its frozen CM-GAN and
  selector inside (``run train_classifier``), plus the training facts (profile, image size, training data).

Every reader uses ``torch.load(..., weights_only=True)`` after checking the file against the SHA-256 written beside it
(``model.pt.sha256``; a file without one is read with a warning). A config value that disagrees with a recorded one (an
override such as ``--shared_backbone``) is an error, not a silent rebuild: :func:`check_overrides`.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from her2_monai.fileio import verify_checksum
from her2_monai.networks.alternatives import MoRANet, SimMLMNet, StainSpecialists
from her2_monai.networks.cmgan import CrossModalGAN
from her2_monai.networks.her2net import HER2FlexibleNet
from her2_monai.networks.record import ArchitectureMismatchError
from her2_monai.networks.selector import BranchSelector

__all__ = [
    "ArchitectureOverrideError",
    "TRAIN_COMMAND",
    "GAN_COMMAND",
    "SELECTOR_COMMAND",
    "ARCHITECTURE_OPTIONS",
    "CLASSIFIERS",
    "read_weights",
    "network_record",
    "frozen_cmgan",
    "frozen_selector",
    "build_network_from_state",
    "check_overrides",
    "build_model",
    "model_image_size",
    "model_min_tissue_fraction",
    "require_model_file",
    "require_stage_inputs",
]

logger = logging.getLogger(__name__)

#: Commands that create each weight file, quoted in missing-file errors.
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundle/configs/train.json"
GAN_COMMAND = "python -m monai.bundle run train_gan --config_file bundle/configs/train.json"
SELECTOR_COMMAND = "python -m monai.bundle run train_selector --config_file bundle/configs/train.json"

_RECORD = "_extra_state"


class ArchitectureOverrideError(ValueError):
    """A config override (``--gan_ngf 4``, ...) disagrees with the architecture a model file records."""


#: Config option -> (state-dict prefix of the network that records it, record section, key). ``image_size`` is a
#: training fact (the magnification the networks learnt), the others are constructor arguments.
ARCHITECTURE_OPTIONS: dict[str, tuple[str, str, str]] = {
    "image_size": ("", "metadata", "image_size"),
    "shared_backbone": ("", "arguments", "shared_backbone"),
    "specific_backbone": ("", "arguments", "specific_backbone"),
    "missing_strategy": ("", "arguments", "missing_strategy"),
    "gan_ngf": ("cmgan.", "arguments", "ngf"),
    "gan_n_blocks": ("cmgan.", "arguments", "n_blocks"),
}


def read_weights(path: str | os.PathLike, what: str = "weights", command: str = TRAIN_COMMAND) -> dict[str, Any]:
    """Read a weight file written by the bundle, with errors a user can act on.

    Args:
        path: the ``.pt`` file.
        what: what the file is, for messages (e.g. ``"trained HER2 classifier"``).
        command: the command that creates it, quoted when it is missing.

    Returns:
        The state dict (tensors, plus ``*._extra_state`` records).

    Raises:
        FileNotFoundError: if the file is missing (naming ``command``).
        her2_monai.fileio.ChecksumMismatchError: (a ``ValueError``) if it differs from its ``.sha256`` file.
        ValueError: if it is not a readable PyTorch file, is truncated, holds something other than a state dict, or
            holds code that ``weights_only=True`` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at '{path}'. Create it with: {command}")
    verify_checksum(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"'{path}' is not a plain weights file ({first[:300]}); refusing to load it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"'{path}' is not a readable PyTorch weights file (truncated or corrupt: {err})") from None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"'{path}' does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def network_record(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any] | None:
    """The architecture record of the network at ``prefix`` in a state dict (``None`` if it has none)."""
    record = state.get(prefix + _RECORD)
    return dict(record) if isinstance(record, Mapping) else None


def _record_or_error(state: Mapping[str, Any], path: str | os.PathLike, expected: str, prefix: str = "") -> dict:
    record = network_record(state, prefix)
    if record is None or record.get("class") != expected:
        found = record.get("class") if record else "no architecture record"
        raise ArchitectureMismatchError(
            f"'{path}' does not hold a {expected} written by this bundle ({found}); it may be another bundle's file"
        )
    return record


def _sub_state(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load(network: nn.Module, state: Mapping[str, Any], path: str | os.PathLike) -> None:
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        summary = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        raise ValueError(f"'{path}' does not fit the network its record describes: {summary[:400]}") from None


def frozen_cmgan(path: str | os.PathLike) -> CrossModalGAN:
    """Rebuild the stage-1 CM-GAN from ``cmgan.pt`` (its recorded architecture), load it and freeze it for stage 2.

    Raises:
        FileNotFoundError: if the file is missing, with the command that creates it.
        ValueError: if it is not a CM-GAN weights file of this bundle.
    """
    state = read_weights(path, "stage-1 CM-GAN weights", GAN_COMMAND + " (or run 'training', which runs every stage)")
    record = _record_or_error(state, path, "CrossModalGAN")
    gan = CrossModalGAN(**record["arguments"])
    _load(gan, state, path)
    return gan.freeze()


def frozen_selector(path: str | os.PathLike) -> BranchSelector:
    """Rebuild the branch selector from ``selector.pt``, load it and put it in eval mode with frozen weights.

    Raises:
        FileNotFoundError: if the file is missing, with the command that creates it.
        ValueError: if it is not a selector weights file of this bundle.
    """
    state = read_weights(path, "branch selector weights", SELECTOR_COMMAND)
    record = _record_or_error(state, path, "BranchSelector")
    selector = BranchSelector(**record["arguments"])
    _load(selector, state, path)
    return selector.requires_grad_(False).eval()


#: Classifiers a ``model.pt`` may hold besides :class:`HER2FlexibleNet` (the comparisons' alternatives).
CLASSIFIERS: dict[str, type[nn.Module]] = {
    "SimMLMNet": SimMLMNet,
    "MoRANet": MoRANet,
    "StainSpecialists": StainSpecialists,
}


def build_network_from_state(state: Mapping[str, Any], path: str | os.PathLike = "<state dict>") -> nn.Module:
    """Rebuild the classifier of a ``model.pt`` state dict from its record and load it.

    A :class:`HER2FlexibleNet` is rebuilt with its CM-GAN and selector; the alternatives of
    :mod:`her2_monai.networks.alternatives` from their own records.

    Args:
        state: the state dict.
        path: where it came from, for messages.

    Returns:
        The network in eval mode.

    Raises:
        ValueError: if the state dict is not a HER2 classifier of this bundle or does not fit its record.
    """
    found = (network_record(state) or {}).get("class")
    if found in CLASSIFIERS:
        network = CLASSIFIERS[found](**network_record(state)["arguments"])
        _load(network, state, path)
        return network.eval()
    record = _record_or_error(state, path, "HER2FlexibleNet")
    cmgan = selector = None
    if network_record(state, "cmgan.") is not None:
        cmgan = CrossModalGAN(**_record_or_error(state, path, "CrossModalGAN", "cmgan.")["arguments"])
    if network_record(state, "selector.") is not None:
        selector = BranchSelector(**_record_or_error(state, path, "BranchSelector", "selector.")["arguments"])
    net = HER2FlexibleNet(**record["arguments"], cmgan=cmgan, selector=selector)
    _load(net, state, path)
    return net.eval()


def _recorded(state: Mapping[str, Any], option: str) -> Any:
    prefix, section, key = ARCHITECTURE_OPTIONS[option]
    record = network_record(state, prefix)
    return None if record is None else (record.get(section) or {}).get(key)


def check_overrides(state: Mapping[str, Any], overrides: Mapping[str, Any] | None, path: str | os.PathLike) -> None:
    """Fail when a configured value disagrees with what the model file records.

    Args:
        state: the model file's state dict.
        overrides: option -> value (keys of :data:`ARCHITECTURE_OPTIONS`); ``None`` values mean "as recorded".
        path: the model file, for the message.

    Raises:
        ValueError: naming every option whose value differs from the record.
    """
    unknown = sorted(set(overrides or {}) - set(ARCHITECTURE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown architecture option(s) {unknown}; expected {sorted(ARCHITECTURE_OPTIONS)}")
    conflicts = []
    for option, value in (overrides or {}).items():
        if value is None or value == "":
            continue
        recorded = _recorded(state, option)
        if recorded is not None and str(recorded) != str(value):
            conflicts.append(f"--{option} {value} (the model was trained with {recorded})")
    if conflicts:
        raise ArchitectureOverrideError(
            f"'{path}' records its own architecture and these settings disagree with it: {'; '.join(conflicts)}. "
            "Drop the override(s): inference, evaluation and export read the architecture from the model file."
        )


def build_model(
    model_file: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    missing_ok: bool = False,
) -> nn.Module:
    """The trained HER2 classifier of a bundle, rebuilt from ``model.pt`` alone.

    Args:
        model_file: ``models/model.pt``.
        overrides: configured architecture options; each must agree with the record (see :func:`check_overrides`).
        missing_ok: when the file does not exist, build an untrained network from ``overrides`` and the constructor
            defaults instead of failing (MONAI's ``verify_net_in_out`` and MONAI Label build the workflow before any
            training).

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: if the file is missing and not ``missing_ok``.
        ValueError: for an unreadable or foreign file, or overrides that disagree with its record.
    """
    if not Path(model_file).is_file() and missing_ok:
        options = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
        strategy = options.get("missing_strategy", "cmgan")
        cmgan = None
        if strategy == "cmgan":
            gan_args = {"ngf": options.get("gan_ngf", 64), "n_blocks": options.get("gan_n_blocks", 9)}
            cmgan = CrossModalGAN(**{k: int(v) for k, v in gan_args.items()})
        net_args = {k: options[k] for k in ("shared_backbone", "specific_backbone") if k in options}
        logger.info("no trained model at %s: built an untrained network from the configuration", model_file)
        return HER2FlexibleNet(
            **net_args, cmgan=cmgan, selector=BranchSelector(), missing_strategy=strategy, metadata=options
        ).eval()
    state = read_weights(model_file, "trained HER2 classifier", TRAIN_COMMAND)
    check_overrides(state, overrides, model_file)
    return build_network_from_state(state, model_file)


def model_image_size(model_file: str | os.PathLike, configured: int | None = None, default: int = 64) -> int:
    """The input side the model was trained at (its record), checked against a configured value.

    Args:
        model_file: ``models/model.pt``.
        configured: a configured ``image_size`` (``None``: take the recorded one).
        default: used when there is no model file yet (workflows built before training).

    Returns:
        The image size in pixels.

    Raises:
        ValueError: if ``configured`` disagrees with the record.
    """
    if not Path(model_file).is_file():
        return int(configured or default)
    state = read_weights(model_file, "trained HER2 classifier", TRAIN_COMMAND)
    check_overrides(state, {"image_size": configured}, model_file)
    recorded = _recorded(state, "image_size")
    return int(recorded if recorded is not None else (configured or default))


def model_min_tissue_fraction(model_file: str | os.PathLike, configured: float | None = None) -> float:
    """The smallest tissue share for a HER2 score: the configured value, else the model file's record.

    Training records the value the input checks were tuned with (``model_metadata.min_tissue_fraction``), so a model
    keeps its threshold when the bundle's default changes; a configured value is a deployment choice and wins.

    Args:
        model_file: ``models/model.pt``.
        configured: ``min_tissue_fraction`` from the config (``None``: take the recorded one).

    Returns:
        The share in ``[0, 1]``; :data:`~her2_monai.transforms.tissue.MIN_TISSUE_FRACTION` when neither is there.

    Raises:
        ValueError: if the configured or recorded value is not a number in ``[0, 1]``.
    """
    from her2_monai.transforms.tissue import MIN_TISSUE_FRACTION

    value, source = configured, "min_tissue_fraction"
    if value is None and Path(model_file).is_file():
        record = network_record(read_weights(model_file, "trained HER2 classifier", TRAIN_COMMAND)) or {}
        value, source = (record.get("metadata") or {}).get("min_tissue_fraction"), f"the record of '{model_file}'"
    if value is None:
        return float(MIN_TISSUE_FRACTION)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"min_tissue_fraction must be a number in [0, 1] (from {source}), got {value!r}")
    return number


def require_model_file(path: str | os.PathLike) -> str:
    """Fail with the training command when the trained classifier is missing.

    Returns:
        ``path`` as a string.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"trained HER2 classifier not found at '{path}'. Create it with: {TRAIN_COMMAND}")
    return str(path)


_STAGE_FILES = {
    "selector.pt": ("branch selector weights", SELECTOR_COMMAND),
    "cmgan.pt": ("stage-1 CM-GAN weights", GAN_COMMAND),
}


def require_stage_inputs(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Fail before stage 2 starts when a weights file of an earlier stage is missing, naming the command that makes it.

    Args:
        paths: the files stage 2 loads (``selector.pt``, and ``cmgan.pt`` unless features are substituted).

    Returns:
        The paths as strings.

    Raises:
        FileNotFoundError: naming every missing file and its command.
    """
    missing = []
    for path in paths:
        if not Path(path).is_file():
            what, command = _STAGE_FILES.get(Path(path).name, ("weights of an earlier stage", TRAIN_COMMAND))
            missing.append(f"{what} not found at '{path}'; create them with: {command}")
    if missing:
        raise FileNotFoundError("; ".join(missing) + " (or run 'training', which runs every stage)")
    return [str(p) for p in paths]
