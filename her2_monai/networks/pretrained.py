"""ImageNet weights for the encoders: torchvision's weight files, through the torch hub cache, without torchvision.

The MM'25 framework and the P001 classifier fine-tune ImageNet-pretrained backbones. torchvision publishes them as
plain state dicts at fixed URLs; :func:`imagenet_state_dict` fetches one with ``torch.hub.load_state_dict_from_url``,
which keeps it in the torch hub cache (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``)
and checks its hash on download. torchvision itself is not needed: the keys are mapped onto MONAI's networks here.

* ResNets: MONAI's ``ResNet`` in torchvision's layout has torchvision's keys
  (:func:`her2_monai.networks.unfreeze.load_pretrained_resnet`).
* EfficientNet-B0: torchvision's ``features.{stage}.{block}.block.{layer}`` keys map onto MONAI's
  ``EfficientNetBNFeatures`` (``_conv_stem``, ``_blocks.{stage}.{index}._expand_conv`` ...) with
  :func:`torchvision_to_monai_efficientnet_keys`. The weights fit exactly; two things differ from torchvision's
  network and make the features close to, not identical with, torchvision's: MONAI pads its five stride-2
  convolutions TensorFlow-style ("same", one pixel more at the bottom/right) where torchvision pads symmetrically,
  and the trunk's BatchNorm epsilon is 1e-3 (torchvision B0: 1e-5). Fine-tuning absorbs both; other
  EfficientNet sizes are not offered.

``pretrained_weights`` in ``train.json`` is read by :class:`PretrainedWeights`: ``""``/``"none"`` (random weights),
``"imagenet"`` (download when not cached; fails with the file to place where when offline), ``"auto"`` (ImageNet
weights of every backbone whose file is already in the hub cache, random otherwise: the ``bci`` profile's default),
or the path of a local torchvision-style ResNet state dict for the shared encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from her2_monai.networks.unfreeze import check_state_dict_fit, read_state_dict

__all__ = [
    "IMAGENET_WEIGHT_URLS",
    "PretrainedWeightsError",
    "PretrainedWeights",
    "hub_checkpoint_path",
    "imagenet_state_dict",
    "torchvision_to_monai_efficientnet_keys",
    "load_pretrained_efficientnet",
]

logger = logging.getLogger(__name__)

_MODELS = "https://download.pytorch.org/models/"
#: torchvision's ImageNet-1k weights (``IMAGENET1K_V1``, what ``pretrained=True`` loads) per backbone name.
IMAGENET_WEIGHT_URLS: dict[str, str] = {
    "resnet18": _MODELS + "resnet18-f37072fd.pth",
    "resnet34": _MODELS + "resnet34-b627a593.pth",
    "resnet50": _MODELS + "resnet50-0676ba61.pth",
    "resnet101": _MODELS + "resnet101-63fe2227.pth",
    "resnet152": _MODELS + "resnet152-394f9c45.pth",
    "efficientnet-b0": _MODELS + "efficientnet_b0_rwightman-7f5810bc.pth",
}
_ROLES = ("shared", "specific")
_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be had (no network, a failed download) or do not exist for a backbone."""


def hub_checkpoint_path(backbone: str) -> Path:
    """Where the torch hub cache keeps (or would keep) the ImageNet weights of ``backbone``.

    Args:
        backbone: a key of :data:`IMAGENET_WEIGHT_URLS`.

    Returns:
        ``<torch.hub.get_dir()>/checkpoints/<file name>``.

    Raises:
        PretrainedWeightsError: if torchvision publishes no ImageNet weights for ``backbone``.
    """
    if backbone not in IMAGENET_WEIGHT_URLS:
        raise PretrainedWeightsError(
            f"no ImageNet weights for backbone '{backbone}'; available for {sorted(IMAGENET_WEIGHT_URLS)}"
        )
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(IMAGENET_WEIGHT_URLS[backbone]).path)


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict of ``backbone``, from the hub cache or downloaded into it.

    Args:
        backbone: a key of :data:`IMAGENET_WEIGHT_URLS`.

    Returns:
        The state dict (torchvision keys), read with ``weights_only=True``.

    Raises:
        PretrainedWeightsError: for an unknown backbone, or when the file is not cached and cannot be downloaded
            (the message names the URL and the exact path to place the file at).
    """
    path = hub_checkpoint_path(backbone)
    url = IMAGENET_WEIGHT_URLS[backbone]
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as err:  # URLError/HTTPError/OSError offline, RuntimeError on a hash mismatch
        raise PretrainedWeightsError(
            f"could not get the ImageNet weights of {backbone}: downloading {url} failed ({type(err).__name__}: "
            f"{err}). Without internet, download that file elsewhere and place it at '{path}' (the torch hub "
            "cache; TORCH_HOME moves it), or pass --pretrained_weights with a local .pth file, or '' for random "
            "weights"
        ) from err


def torchvision_to_monai_efficientnet_keys(net: nn.Module) -> dict[str, str]:
    """Map torchvision EfficientNet state-dict keys onto a MONAI ``EfficientNetBNFeatures`` (built with the same
    width and depth, e.g. both B0).

    torchvision: ``features.0`` (stem convolution + BatchNorm), ``features.{s+1}.{j}.block`` (MBConv ``j`` of stage
    ``s``: ``[expand,] depthwise`` as ``Conv2dNormActivation`` (``.0`` convolution, ``.1`` BatchNorm), the
    squeeze-excitation ``fc1``/``fc2``, then the projection), ``features.{last}`` (head) and ``classifier``. MONAI:
    ``_conv_stem``/``_bn0``, ``_blocks.{s}.{global index}`` with ``_expand_conv``/``_bn0``, ``_depthwise_conv``/
    ``_bn1``, ``_se_reduce``/``_se_expand``, ``_project_conv``/``_bn2``. Blocks without expansion (ratio 1) have no
    expand layers in either.

    Args:
        net: the MONAI network (its ``_blocks`` define the stages).

    Returns:
        ``{torchvision key: MONAI key}`` for every stem and block entry (head and classifier excluded).
    """
    mapping = {"features.0.0.weight": "_conv_stem.weight"}
    mapping.update({f"features.0.1.{e}": f"_bn0.{e}" for e in _BN_ENTRIES})
    for s, stage in enumerate(net._blocks):
        for j, (index, block) in enumerate(stage.named_children()):
            tv, mo = f"features.{s + 1}.{j}.block.", f"_blocks.{s}.{index}."
            layers = ([("_expand_conv", "_bn0")] if block.expand_ratio != 1 else []) + [("_depthwise_conv", "_bn1")]
            for layer, (conv, bn) in enumerate(layers):
                mapping[f"{tv}{layer}.0.weight"] = f"{mo}{conv}.weight"
                mapping.update({f"{tv}{layer}.1.{e}": f"{mo}{bn}.{e}" for e in _BN_ENTRIES})
            se, project = len(layers), len(layers) + 1
            for fc, name in (("fc1", "_se_reduce"), ("fc2", "_se_expand")):
                mapping.update({f"{tv}{se}.{fc}.{e}": f"{mo}{name}.{e}" for e in ("weight", "bias")})
            mapping[f"{tv}{project}.0.weight"] = f"{mo}_project_conv.weight"
            mapping.update({f"{tv}{project}.1.{e}": f"{mo}_bn2.{e}" for e in _BN_ENTRIES})
    return mapping


def _state_dict_from(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = read_state_dict(source, marker="features.0.0.weight", what="EfficientNet")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def load_pretrained_efficientnet(
    net: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """Load torchvision EfficientNet weights (e.g. ImageNet B0) onto a MONAI ``EfficientNetBNFeatures`` trunk.

    Head (``features.<last>``) and ``classifier`` entries are ignored: the trunk ends at the last MBConv block.

    Args:
        net: the MONAI network (``EfficientNetTrunk.net``).
        source: a ``.pth`` state dict path or the mapping itself.

    Returns:
        ``{"loaded": [...MONAI keys], "ignored": [...file keys]}``.

    Raises:
        FileNotFoundError: if ``source`` is a path that does not exist.
        StateDictMismatchError: listing missing keys, unexpected keys and shape mismatches together.
    """
    state = _state_dict_from(source)
    mapping = torchvision_to_monai_efficientnet_keys(net)
    target = net.state_dict()
    head = f"features.{len(net._blocks) + 1}."
    mapped, ignored, unexpected = {}, [], []
    for key, value in state.items():
        if key in mapping:
            mapped[mapping[key]] = value
        elif key.startswith((head, "classifier.")):
            ignored.append(key)
        else:
            unexpected.append(key)
    wanted = {mapping[k] for k in mapping if mapping[k] in target}
    check_state_dict_fit(
        mapped,
        target,
        missing=[k for k in wanted - mapped.keys() if not k.endswith("num_batches_tracked")],
        unexpected=unexpected,
        what=f"pretrained EfficientNet weights do not fit {type(net).__name__}",
        expected="Expected a torchvision EfficientNet state dict of the same size (keys like 'features.0.0.weight', "
        "'features.1.0.block.0.0.weight'; the head 'features.8.*' and 'classifier.*' are ignored).",
    )
    new_state = dict(target)
    for key, value in mapped.items():
        new_state[key] = value.to(dtype=target[key].dtype)
    net.load_state_dict(new_state, strict=True)
    return {"loaded": sorted(mapped), "ignored": sorted(ignored)}


class PretrainedWeights:
    """Which weights the shared and specific encoders start from, decided from the ``pretrained_weights`` setting.

    Deciding reads nothing but the hub cache's file list; :meth:`fetch` loads (and for ``"imagenet"`` downloads)
    the weights. ``description`` says what was chosen, for the log, the MLflow parameters and the model record.

    Args:
        setting: ``""``/``"none"``, ``"imagenet"``, ``"auto"`` or a local ``.pth`` path (the shared ResNet's).
        shared_backbone: the shared encoder's name (a ResNet).
        specific_backbone: the specific encoders' name.

    Raises:
        PretrainedWeightsError: for ``"imagenet"`` with a backbone that has no ImageNet weights.
        FileNotFoundError: for a path that does not exist.
    """

    def __init__(self, setting: str | os.PathLike | None, shared_backbone: str, specific_backbone: str) -> None:
        text = "" if setting is None else str(setting).strip()
        self.setting = text
        self.backbones = {"shared": shared_backbone, "specific": specific_backbone}
        #: role -> ("imagenet", backbone) / ("file", path) / (None, reason)
        self.sources: dict[str, tuple[str | None, str]] = {}
        if text.lower() in ("", "none"):
            self.sources = {role: (None, "random weights") for role in _ROLES}
        elif text.lower() == "imagenet":
            for role in _ROLES:
                hub_checkpoint_path(self.backbones[role])  # raises for a backbone without ImageNet weights
                self.sources[role] = ("imagenet", self.backbones[role])
        elif text.lower() == "auto":
            for role in _ROLES:
                name = self.backbones[role]
                if name not in IMAGENET_WEIGHT_URLS:
                    self.sources[role] = (None, f"random weights: no ImageNet weights exist for {name}")
                elif hub_checkpoint_path(name).is_file():
                    self.sources[role] = ("imagenet", name)
                else:
                    self.sources[role] = (None, f"random weights: {hub_checkpoint_path(name)} is not in the cache")
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"pretrained_weights '{text}' is neither a file nor one of '', 'none', 'imagenet', 'auto'"
                )
            self.sources = {"shared": ("file", str(path.resolve())), "specific": (None, "random weights")}
        self._fetched: dict[str, object] | None = None

    def _describe(self, role: str) -> str:
        kind, detail = self.sources[role]
        name = self.backbones[role]
        if kind == "imagenet":
            return f"{role} {name}: ImageNet (torchvision {hub_checkpoint_path(name).name})"
        if kind == "file":
            return f"{role} {name}: {detail}"
        return f"{role} {name}: {detail}"

    @property
    def description(self) -> str:
        """One line: which weights each encoder starts from."""
        return "; ".join(self._describe(role) for role in _ROLES)

    @property
    def uses_pretrained(self) -> bool:
        """Whether any encoder starts from loaded weights."""
        return any(kind is not None for kind, _ in self.sources.values())

    def fetch(self) -> dict[str, object]:
        """Load the chosen weights (downloading ImageNet files when ``"imagenet"`` and not cached), once.

        Call it before a long run starts so that an offline machine fails at once, not after stage 1.

        Returns:
            ``{"shared": state dict, path or None, "specific": state dict or None}``.

        Raises:
            PretrainedWeightsError: when ImageNet weights cannot be downloaded (see :func:`imagenet_state_dict`).
        """
        if self._fetched is None:
            fetched: dict[str, object] = {}
            for role in _ROLES:
                kind, detail = self.sources[role]
                if kind == "imagenet":
                    fetched[role] = imagenet_state_dict(detail)
                elif kind == "file":
                    fetched[role] = detail
                else:
                    fetched[role] = None
            self._fetched = fetched
            if self.setting.lower() == "auto" and not self.uses_pretrained:
                logger.warning(
                    "pretrained weights: none in the torch hub cache (%s), so the encoders start from random weights. "
                    "--pretrained_weights imagenet downloads them (%s), or place the files there.",
                    hub_checkpoint_path("resnet50").parent,
                    ", ".join(
                        hub_checkpoint_path(b).name for b in self.backbones.values() if b in IMAGENET_WEIGHT_URLS
                    ),
                )
            else:
                logger.info("pretrained weights: %s", self.description)
        return self._fetched

    def shared(self) -> object:
        """The shared encoder's weights for ``HER2FlexibleNet(pretrained_weights=...)``."""
        return self.fetch()["shared"]

    def specific(self) -> object:
        """The specific encoders' weights for ``HER2FlexibleNet(specific_pretrained_weights=...)``."""
        return self.fetch()["specific"]
