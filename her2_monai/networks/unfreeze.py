"""Hybrid unfreezing of ResNet trunks and loading of torchvision-style ResNet weights onto MONAI's ResNet.

Hybrid unfreezing (the P001 HER2 classifier's recipe) freezes the early, generic stages of a ResNet (stem, ``layer1``,
``layer2``) and fine-tunes ``layer3``, ``layer4`` and everything after them. MONAI's ``monai.networks.nets.ResNet``
uses the same attribute names as torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``), so
both the stage names and the state-dict keys below refer to either.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from her2_monai.utils import as_bool

__all__ = [
    "DEFAULT_FROZEN_STAGES",
    "HYBRID_UNFREEZING_AUTO",
    "RESNET_STAGES",
    "StateDictMismatchError",
    "check_state_dict_fit",
    "freeze_resnet_stages",
    "keep_frozen_batchnorm_eval",
    "list_keys",
    "load_pretrained_resnet",
    "read_state_dict",
    "resolve_hybrid_unfreezing",
    "torchvision_to_monai_resnet_key",
]

#: Stages of a (MONAI or torchvision) ResNet in forward order. ``act`` and ``maxpool`` hold no parameters.
RESNET_STAGES: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
#: Stages frozen by hybrid unfreezing: the stem and the first two residual stages.
DEFAULT_FROZEN_STAGES: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")

#: ``hybrid_unfreezing`` value that freezes the early stages only when they start from pretrained weights.
HYBRID_UNFREEZING_AUTO = "auto"

_MAX_LISTED_KEYS = 12


def resolve_hybrid_unfreezing(setting: bool | str | None, pretrained: bool) -> bool:
    """Decide whether hybrid unfreezing freezes the early ResNet stages.

    Freezing only makes sense for stages that already compute useful features: a randomly initialised stem frozen
    with the untrained running statistics of its BatchNorm layers (mean 0, variance 1) stays a fixed random filter
    bank for the whole run, which costs the classifier accuracy and makes it depend on the seed. ``"auto"`` therefore
    freezes only when the shared ResNet starts from pretrained weights.

    Args:
        setting: ``"auto"``, ``True``/``False`` or a boolean string from the command line (``"true"``, ``"false"``).
        pretrained: whether the shared ResNet starts from pretrained weights.

    Returns:
        Whether to freeze the stages.

    Raises:
        ValueError: for any other value.
    """
    if isinstance(setting, str) and setting.strip().lower() == HYBRID_UNFREEZING_AUTO:
        return bool(pretrained)
    try:
        freeze = as_bool(setting, "hybrid_unfreezing")
    except ValueError:
        raise ValueError(f"hybrid_unfreezing must be 'auto', true or false, got '{setting}'") from None
    if freeze and not pretrained:
        warnings.warn(
            "hybrid_unfreezing=true freezes randomly initialised ResNet stages (no pretrained weights were given): "
            "they stay a fixed random filter bank for the whole run. Use hybrid_unfreezing='auto' (freeze only "
            "pretrained stages) unless this is intended.",
            stacklevel=2,
        )
    return freeze


class StateDictMismatchError(KeyError, ValueError):
    """A state dict does not fit a network: keys are missing or unexpected, or tensor shapes differ.

    It is both a ``KeyError`` (missing/unexpected keys) and a ``ValueError`` (bad input), so callers may catch either.
    """

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


def freeze_resnet_stages(model: nn.Module, stages: Sequence[str] = DEFAULT_FROZEN_STAGES) -> list[str]:
    """Freeze the named stages of a ResNet: their parameters stop requiring grad and their BatchNorm layers go to eval.

    BatchNorm layers of frozen stages are put in eval mode as well, so that their running statistics stay those the
    frozen convolution weights were trained with (pretrained weights) instead of drifting with the small (batch 8)
    training batches, which would change what the frozen stages compute although none of their weights train.
    ``nn.Module.train()`` switches them back to training mode; call :func:`keep_frozen_batchnorm_eval` after it (the
    :class:`her2_monai.networks.encoders.ResNetTrunk` does this in its ``train()``).

    Args:
        model: a MONAI ``ResNet`` (or any module with the named stages as attributes).
        stages: attribute names of the stages to freeze; defaults to stem + ``layer1`` + ``layer2``.

    Returns:
        The names of the frozen stages.

    Raises:
        ValueError: if a stage name is not an attribute of ``model``.
    """
    frozen = []
    for name in stages:
        stage = getattr(model, name, None)
        if not isinstance(stage, nn.Module):
            available = [n for n in RESNET_STAGES if isinstance(getattr(model, n, None), nn.Module)]
            raise ValueError(
                f"cannot freeze stage '{name}': {type(model).__name__} has no such submodule; "
                f"ResNet stages available: {available}"
            )
        for param in stage.parameters():
            param.requires_grad_(False)
        frozen.append(name)
    keep_frozen_batchnorm_eval(model)
    return frozen


def keep_frozen_batchnorm_eval(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer whose affine parameters are all frozen into eval mode (running statistics fixed).

    Args:
        module: any module; BatchNorm layers without affine parameters are left alone.

    Returns:
        ``module``, for chaining.
    """
    for sub in module.modules():
        if isinstance(sub, _BatchNorm):
            params = list(sub.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                sub.eval()
    return module


def torchvision_to_monai_resnet_key(key: str) -> str | None:
    """Map one torchvision ResNet state-dict key to MONAI's ``ResNet`` key.

    MONAI 1.x names the stem and residual stages exactly as torchvision does (``conv1``, ``bn1``, ``layerN.i.convK``,
    ``layerN.i.bnK``, ``layerN.i.downsample.{0,1}``), so keys map to themselves; the classifier ``fc.*`` is dropped
    because the trunks here have no ``fc``, and a DDP ``module.`` prefix is removed.

    Args:
        key: a key of a torchvision ResNet state dict.

    Returns:
        The MONAI key, or ``None`` if the entry is to be ignored.
    """
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("fc."):
        return None
    return key


def list_keys(keys: Iterable[str]) -> str:
    """At most a dozen sorted names, then how many more, for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]"


def check_state_dict_fit(
    mapped: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    missing: Iterable[str],
    unexpected: Iterable[str],
    what: str,
    expected: str,
) -> None:
    """Report every way a (key-mapped) state dict does not fit a network, in one error.

    Args:
        mapped: the file's tensors under the network's key names.
        target: the network's ``state_dict()``; shapes of the keys both hold are compared.
        missing: network keys the file lacks (the caller decides which keys are optional).
        unexpected: file keys the network has no place for.
        what: the start of the message, e.g. ``"pretrained ResNet weights do not fit ResNet"``.
        expected: a sentence saying what a fitting file looks like (the fix).

    Raises:
        StateDictMismatchError: ``"<what>: <n> missing key(s) [...]; <n> unexpected key(s) [...]; <n> shape
            mismatch(es) [...]. <expected>"``, naming the problems that occur (at most a dozen of each).
    """
    missing, unexpected = list(missing), list(unexpected)
    mismatched = [
        f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(mapped.keys() & target.keys())
        if mapped[k].shape != target[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {list_keys(unexpected)}")
    if mismatched:
        shown = "; ".join(mismatched[:_MAX_LISTED_KEYS])
        more = f"; ... ({len(mismatched) - _MAX_LISTED_KEYS} more)" if len(mismatched) > _MAX_LISTED_KEYS else ""
        problems.append(f"{len(mismatched)} shape mismatch(es) [{shown}{more}]")
    raise StateDictMismatchError(f"{what}: {'; '.join(problems)}. {expected}")


def read_state_dict(
    source: str | os.PathLike | Mapping[str, torch.Tensor], marker: str = "conv1.weight", what: str = "ResNet"
) -> dict[str, torch.Tensor]:
    """A pretrained state dict from a file (``weights_only``) or a mapping, unwrapped from a training checkpoint.

    Args:
        source: ``.pth`` file or a state dict.
        marker: a key the bare state dict has; without it, a ``state_dict`` or ``model`` entry is looked into.
        what: the network named in the missing-file message.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not a mapping of names to tensors.
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained {what} weights not found: '{path}'")
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Checkpoints written by training loops wrap the weights one level down.
    for wrapper in ("state_dict", "model"):
        if marker not in state and isinstance(state.get(wrapper), Mapping):
            state = dict(state[wrapper])
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (mapping of names to tensors), got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict entries must be tensors; these are not: {list_keys(bad)}")
    return state


def load_pretrained_resnet(model: nn.Module, path: str | Path | Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load a torchvision-style ResNet state dict (e.g. ImageNet ResNet50) onto a MONAI ``ResNet`` feature trunk.

    The MONAI network must have torchvision's layout to receive the weights: ``shortcut_type="B"`` (1x1 convolution
    shortcuts), ``conv1_t_stride=2`` (stride is not part of the weights, but features differ without it). Entries are
    mapped with :func:`torchvision_to_monai_resnet_key`; ``fc.*`` is ignored. MONAI's shortcut convolution may carry a
    bias (``bias_downsample=True``) which torchvision's lacks: it is set to zero, which is exactly equivalent.
    ``num_batches_tracked`` buffers absent from the file keep their current value.

    Args:
        model: the MONAI ``ResNet`` (``feed_forward=False`` or not; its ``fc`` is left untouched).
        path: a file written by ``torch.save(state_dict)`` (read with ``weights_only=True``), or the mapping itself.

    Returns:
        ``{"loaded": [...], "ignored": [...], "zero_filled": [...]}``: MONAI keys loaded, file keys ignored, MONAI
        keys set to zero.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        StateDictMismatchError: (a ``KeyError`` and ``ValueError``) listing missing keys, unexpected keys and shape
            mismatches, all at once, e.g. for a ResNet18 file loaded onto a ResNet50.
    """
    source = read_state_dict(path)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in source.items():
        new_key = torchvision_to_monai_resnet_key(key)
        if new_key is None:
            ignored.append(key)
        else:
            mapped[new_key] = value

    target_keys = {k for k in target if not k.startswith("fc.")}
    zero_filled = [k for k in target_keys - mapped.keys() if k.endswith("downsample.0.bias")]
    optional = {k for k in target_keys - mapped.keys() if k.endswith("num_batches_tracked")}
    check_state_dict_fit(
        mapped,
        {k: target[k] for k in target_keys},
        missing=target_keys - mapped.keys() - set(zero_filled) - optional,
        unexpected=mapped.keys() - target_keys,
        what=f"pretrained ResNet weights do not fit {type(model).__name__}",
        expected="Expected a torchvision-style ResNet state dict of the same depth (keys like 'conv1.weight', "
        "'layer1.0.conv1.weight', 'layer1.0.downsample.0.weight'; 'fc.*' is ignored).",
    )
    new_state = dict(target)
    for key in target_keys:
        if key in mapped:
            new_state[key] = mapped[key].to(dtype=target[key].dtype)
        elif key in zero_filled:
            new_state[key] = torch.zeros_like(target[key])
    model.load_state_dict(new_state, strict=True)
    return {"loaded": sorted(mapped), "ignored": sorted(ignored), "zero_filled": sorted(zero_filled)}
