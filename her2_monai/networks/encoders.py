"""Disentangled (ShaSpec-style) encoders: one shared trunk for all stains, one specific trunk per stain, and fusion.

ShaSpec (Wang et al., CVPR'23) encodes each modality twice: with a **shared** encoder (the same weights for every
stain, pushed by the DAO loss to produce stain-invariant features) and with a **specific** encoder of its own (pushed by
the DCO loss to produce stain-identifying features). The two are fused per stain by a residual convolution,
``f = r + Conv3x3([r, s])``. The MM'25 HER2 framework uses a ResNet50 shared encoder and lighter specific encoders.

Trunks are MONAI networks built with torchvision's layout, so torchvision ImageNet weights can be loaded with
:func:`her2_monai.networks.unfreeze.load_pretrained_resnet`; they return the last feature map (stride 32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import EfficientNetBNFeatures
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from her2_monai.constants import STAINS
from her2_monai.networks.pretrained import load_pretrained_efficientnet
from her2_monai.networks.unfreeze import (
    DEFAULT_FROZEN_STAGES,
    HYBRID_UNFREEZING_AUTO,
    freeze_resnet_stages,
    keep_frozen_batchnorm_eval,
    load_pretrained_resnet,
    resolve_hybrid_unfreezing,
)

__all__ = [
    "RESNET_ARCHS",
    "RESNET_BACKBONES",
    "EFFICIENTNET_BACKBONES",
    "BACKBONES",
    "ResNetTrunk",
    "EfficientNetTrunk",
    "build_encoder",
    "ResidualFusion",
    "DisentangledEncoder",
]

#: MONAI ResNet variants: name -> (block type, blocks per stage).
RESNET_ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet10": (ResNetBlock, (1, 1, 1, 1)),
    "resnet18": (ResNetBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
    "resnet101": (ResNetBottleneck, (3, 4, 23, 3)),
    "resnet152": (ResNetBottleneck, (3, 8, 36, 3)),
}
RESNET_BACKBONES: tuple[str, ...] = tuple(RESNET_ARCHS)
EFFICIENTNET_BACKBONES: tuple[str, ...] = tuple(f"efficientnet-b{i}" for i in range(8))
BACKBONES: tuple[str, ...] = RESNET_BACKBONES + EFFICIENTNET_BACKBONES


def _weights_given(weights: str | Path | Mapping[str, torch.Tensor] | None) -> bool:
    """Whether a ``pretrained_weights`` argument names weights (``None`` and ``""`` mean random initialisation)."""
    return weights is not None and not (isinstance(weights, str) and not weights)


class ResNetTrunk(nn.Module):
    """A MONAI 2D ResNet without pooling and classifier, in torchvision's layout, returning the stride-32 feature map.

    The network is ``monai.networks.nets.ResNet(..., spatial_dims=2, conv1_t_stride=2, shortcut_type="B",
    bias_downsample=False, feed_forward=False)``: a stride-2 7x7 stem and 1x1-convolution shortcuts without bias, as in
    torchvision (MONAI's defaults, stride-1 stem and biased shortcuts, would cost 4x the compute and not take ImageNet
    weights). Its state-dict keys are therefore those of torchvision's ResNet under the ``resnet.`` prefix. The stem
    and the four stages are exposed (:meth:`stem`, :attr:`stages`) for models that adapt features between stages.

    Args:
        name: one of :data:`RESNET_BACKBONES`.
        in_channels: image channels.
        frozen_stages: stages frozen by hybrid unfreezing (e.g. ``("conv1", "bn1", "layer1", "layer2")``); empty: none.
        pretrained_weights: optional torchvision-style ResNet state dict (path or mapping) of the same depth.
        freeze_batchnorm: keep BatchNorm layers of frozen stages in eval mode, also after ``train()``.
        block_inplanes: base widths of the four stages (default ``(64, 128, 256, 512)``; smaller for tests).

    Raises:
        ValueError: for an unknown ``name`` or stage name, or ``block_inplanes`` that are not four positive widths.
    """

    def __init__(
        self,
        name: str = "resnet50",
        in_channels: int = 3,
        frozen_stages: Sequence[str] = (),
        pretrained_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
        freeze_batchnorm: bool = True,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if name not in RESNET_ARCHS:
            raise ValueError(f"unknown ResNet backbone '{name}'; expected one of {RESNET_BACKBONES}")
        if len(block_inplanes) != 4 or any(int(c) < 1 for c in block_inplanes):
            raise ValueError(f"block_inplanes must be four positive widths, got {tuple(block_inplanes)}")
        block, layers = RESNET_ARCHS[name]
        self.resnet = ResNet(
            block,
            list(layers),
            [int(c) for c in block_inplanes],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        self.name = name
        #: Output channels of stages 1-4.
        self.stage_channels: tuple[int, ...] = tuple(int(c) * block.expansion for c in block_inplanes)
        self.out_channels: int = self.stage_channels[-1]
        if _weights_given(pretrained_weights):
            load_pretrained_resnet(self.resnet, pretrained_weights)
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self.frozen_stages = freeze_resnet_stages(self.resnet, frozen_stages) if frozen_stages else []

    @property
    def stages(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """The four residual stages (``layer1`` ... ``layer4``)."""
        net = self.resnet
        return (net.layer1, net.layer2, net.layer3, net.layer4)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """7x7 stride-2 convolution, BatchNorm, ReLU and max-pooling: ``(B, C, H, W) -> (B, C', H/4, W/4)``."""
        net = self.resnet
        x = net.act(net.bn1(net.conv1(x)))
        return x if net.no_max_pool else net.maxpool(x)

    def train(self, mode: bool = True) -> ResNetTrunk:
        """Set train/eval mode; BatchNorm layers of frozen stages stay in eval mode if ``freeze_batchnorm``.

        Args:
            mode: requested mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        if self.freeze_batchnorm:
            keep_frozen_batchnorm_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: ``(B, C_in, H, W)``.

        Returns:
            ``(B, out_channels, H/32, W/32)`` feature map.
        """
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


class EfficientNetTrunk(nn.Module):
    """MONAI's EfficientNet (``EfficientNetBNFeatures``) without its 1x1 head convolution and classifier.

    EfficientNet-B0 is built from the same inverted-residual (MBConv) blocks with squeeze-and-excitation as the
    MobileNetV3 the MM'25 paper used for its specific encoders (MONAI has no MobileNetV3; both come from the MnasNet
    search space), at a similar size (3.6 M parameters without head). Unused head layers are removed so every
    parameter receives a gradient (DDP without ``find_unused_parameters``). The plain swish replaces MONAI's
    memory-efficient autograd swish so the trunk traces/exports, and BatchNorm momentum defaults to PyTorch's 0.1
    instead of TensorFlow's 0.01: the trunk trains from scratch, where slow running statistics lag the weights.

    Args:
        name: one of :data:`EFFICIENTNET_BACKBONES`.
        in_channels: image channels.
        bn_momentum: BatchNorm momentum (PyTorch convention).
        pretrained_weights: optional torchvision EfficientNet state dict (path or mapping) of the same size, e.g.
            ImageNet B0 (:mod:`her2_monai.networks.pretrained`, which also says how MONAI's network differs).

    Raises:
        ValueError: for an unknown ``name``.
    """

    def __init__(
        self,
        name: str = "efficientnet-b0",
        in_channels: int = 3,
        bn_momentum: float = 0.1,
        pretrained_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if name not in EFFICIENTNET_BACKBONES:
            raise ValueError(f"unknown EfficientNet backbone '{name}'; expected one of {EFFICIENTNET_BACKBONES}")
        # pretrained=False: MONAI would download TensorFlow-ported weights; torchvision's are loaded below instead.
        self.net = EfficientNetBNFeatures(
            name,
            pretrained=False,
            spatial_dims=2,
            in_channels=in_channels,
            norm=("batch", {"eps": 1e-3, "momentum": bn_momentum}),
        )
        self.net.set_swish(memory_efficient=False)
        for unused in ("_conv_head", "_conv_head_padding", "_bn1", "_avg_pooling", "_dropout", "_fc"):
            setattr(self.net, unused, nn.Identity())
        self.name = name
        last_bn = [m for m in self.net._blocks.modules() if isinstance(m, _BatchNorm)][-1]
        self.out_channels: int = int(last_bn.num_features)
        if pretrained_weights is not None:
            load_pretrained_efficientnet(self.net, pretrained_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: ``(B, C_in, H, W)``.

        Returns:
            ``(B, out_channels, H/32, W/32)`` feature map.
        """
        return self.net(x)[-1]


def build_encoder(name: str, in_channels: int = 3, **kwargs) -> ResNetTrunk | EfficientNetTrunk:
    """Build a feature trunk by name.

    Args:
        name: a ResNet (``"resnet10"`` ... ``"resnet152"``) or EfficientNet (``"efficientnet-b0"`` ...) name.
        in_channels: image channels.
        kwargs: passed to :class:`ResNetTrunk` or :class:`EfficientNetTrunk`.

    Returns:
        The trunk; its ``out_channels`` attribute gives the feature width.

    Raises:
        ValueError: for an unknown name.
    """
    if name in RESNET_BACKBONES:
        return ResNetTrunk(name, in_channels=in_channels, **kwargs)
    if name in EFFICIENTNET_BACKBONES:
        return EfficientNetTrunk(name, in_channels=in_channels, **kwargs)
    raise ValueError(f"unknown backbone '{name}'; expected one of {BACKBONES}")


class ResidualFusion(nn.Module):
    """ShaSpec's residual fusion of one stain's shared feature ``r`` and specific feature ``s``: ``r + Conv3x3([r,s])``.

    Feature maps whose width differs from the fusion width are first projected by a 1x1 ``Conv-BN`` (no activation).
    The fusion width defaults to the shared width (the paper's form); a smaller ``fusion_channels`` projects the
    shared feature too, which keeps the 3x3 convolution affordable for a ResNet50 shared encoder (2048 + 320 -> 2048
    channels would be 43.6 M parameters per stain; 512 + 512 -> 512 is 4.7 M). A specific map of another spatial size
    is resized bilinearly to the shared one.

    Args:
        shared_channels: width of ``r``.
        specific_channels: width of ``s``.
        fusion_channels: width of the fused feature; ``None``: ``shared_channels``.
        kernel_size: kernel of the fusion convolution (3 in ShaSpec).
    """

    def __init__(
        self, shared_channels: int, specific_channels: int, fusion_channels: int | None = None, kernel_size: int = 3
    ) -> None:
        super().__init__()
        width = int(fusion_channels or shared_channels)
        self.out_channels = width
        self.shared_proj = self._projection(shared_channels, width)
        self.specific_proj = self._projection(specific_channels, width)
        self.fuse = nn.Conv2d(2 * width, width, kernel_size=kernel_size, padding=kernel_size // 2)

    @staticmethod
    def _projection(in_channels: int, out_channels: int) -> nn.Module:
        if in_channels == out_channels:
            return nn.Identity()
        return Convolution(2, in_channels, out_channels, kernel_size=1, act=None, norm="batch", bias=False)

    def forward(self, shared: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        """Fuse.

        Args:
            shared: ``(B, shared_channels, h, w)``.
            specific: ``(B, specific_channels, h', w')``.

        Returns:
            ``(B, out_channels, h, w)``.
        """
        r = self.shared_proj(shared)
        s = self.specific_proj(specific)
        if s.shape[-2:] != r.shape[-2:]:
            s = F.interpolate(s, size=r.shape[-2:], mode="bilinear", align_corners=False)
        return r + self.fuse(torch.cat([r, s], dim=1))


class DisentangledEncoder(nn.Module):
    """Shared trunk + one specific trunk and one residual fusion per stain + the linear stain classifier of DCO.

    All stains go through the shared trunk in one concatenated batch (one call, and its BatchNorm statistics are
    pooled over stains, which suits weights meant to be stain-invariant). Hybrid unfreezing applies to the shared
    ResNet only: it is the network that receives ImageNet weights; specific trunks are light and train fully.

    Args:
        shared_backbone: a ResNet name (:data:`RESNET_BACKBONES`), default ``"resnet50"`` as in MM'25.
        specific_backbone: any name in :data:`BACKBONES`; default ``"efficientnet-b0"`` (see
            :class:`EfficientNetTrunk` for why it stands in for MobileNetV3).
        in_channels: image channels.
        stains: stain names, in mask-column order.
        fusion_channels: fused feature width (see :class:`ResidualFusion`); ``None``: the shared width.
        hybrid_unfreezing: freeze ``frozen_stages`` of the shared ResNet: ``"auto"`` (default) only when
            ``pretrained_weights`` are given, or ``True``/``False`` (see
            :func:`~her2_monai.networks.unfreeze.resolve_hybrid_unfreezing`).
        frozen_stages: stages frozen when ``hybrid_unfreezing``.
        pretrained_weights: optional torchvision-style state dict (path or mapping) for the shared ResNet.
        freeze_batchnorm: keep frozen stages' BatchNorm in eval mode.
        specific_pretrained_weights: optional torchvision state dict (path or mapping) for each specific trunk.

    Raises:
        ValueError: for unknown backbones.
    """

    def __init__(
        self,
        shared_backbone: str = "resnet50",
        specific_backbone: str = "efficientnet-b0",
        in_channels: int = 3,
        stains: Sequence[str] = STAINS,
        fusion_channels: int | None = 512,
        hybrid_unfreezing: bool | str = HYBRID_UNFREEZING_AUTO,
        frozen_stages: Sequence[str] = DEFAULT_FROZEN_STAGES,
        pretrained_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
        freeze_batchnorm: bool = True,
        specific_pretrained_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if shared_backbone not in RESNET_BACKBONES:
            raise ValueError(f"shared_backbone must be a ResNet, one of {RESNET_BACKBONES}; got '{shared_backbone}'")
        self.stains = tuple(stains)
        self.hybrid_unfreezing = resolve_hybrid_unfreezing(hybrid_unfreezing, _weights_given(pretrained_weights))
        self.shared = ResNetTrunk(
            shared_backbone,
            in_channels=in_channels,
            frozen_stages=tuple(frozen_stages) if self.hybrid_unfreezing else (),
            pretrained_weights=pretrained_weights,
            freeze_batchnorm=freeze_batchnorm,
        )
        specific_kwargs = (
            {} if specific_pretrained_weights is None else {"pretrained_weights": specific_pretrained_weights}
        )
        self.specific = nn.ModuleDict(
            {s: build_encoder(specific_backbone, in_channels, **specific_kwargs) for s in self.stains}
        )
        specific_channels = self.specific[self.stains[0]].out_channels
        self.fusion = nn.ModuleDict(
            {s: ResidualFusion(self.shared.out_channels, specific_channels, fusion_channels) for s in self.stains}
        )
        self.stain_classifier = nn.Linear(specific_channels, len(self.stains))
        self.shared_channels = self.shared.out_channels
        self.specific_channels = specific_channels
        self.out_channels = self.fusion[self.stains[0]].out_channels

    def encode(self, images: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Shared and specific feature maps of each stain.

        Args:
            images: one ``(B, C_in, H, W)`` tensor per stain, in ``stains`` order.

        Returns:
            ``(shared, specific)``: lists of ``(B, shared_channels, h, w)`` and ``(B, specific_channels, h, w)`` maps.
        """
        # split by the stains' batch sizes, not chunk(): chunk's arithmetic on a symbolic batch pins it to the
        # example's size in an ONNX export (torch.export).
        shared = list(self.shared(torch.cat(list(images), dim=0)).split([x.shape[0] for x in images], dim=0))
        specific = [self.specific[s](x) for s, x in zip(self.stains, images)]
        return shared, specific

    def fuse(self, shared: Sequence[torch.Tensor], specific: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Residual fusion per stain.

        Returns:
            One ``(B, out_channels, h, w)`` map per stain.
        """
        return [self.fusion[s](r, f) for s, r, f in zip(self.stains, shared, specific)]

    def stain_logits(self, specific: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """DCO stain classifier on the global average of each specific map.

        Returns:
            One ``(B, num_stains)`` logit tensor per stain.
        """
        return [self.stain_classifier(f.mean(dim=(2, 3))) for f in specific]

    def forward(self, images: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Encode, classify the specific features by stain, and fuse.

        Args:
            images: one ``(B, C_in, H, W)`` tensor per stain.

        Returns:
            ``{"shared": [...], "specific": [...], "fused": [...], "specific_logits": [...]}``, one entry per stain.
        """
        shared, specific = self.encode(images)
        return {
            "shared": shared,
            "specific": specific,
            "fused": self.fuse(shared, specific),
            "specific_logits": self.stain_logits(specific),
        }
