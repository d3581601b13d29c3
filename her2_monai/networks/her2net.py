"""HER2FlexibleNet: the MM'25 HER2 classifier for H&E, IHC or both.

Pipeline per batch: fill each missing stain (frozen CM-GAN synthesis, or ShaSpec feature substitution) -> shared
ResNet + stain-specific encoders -> residual fusion per stain -> modality-sensitive (CBAM) attention over both stains
-> GAP + global-max-pool head -> 4 HER2 logits. The network returns predictions and the named features that other
parts need; the training objective (class-weighted CE + DAO + DCO) is :class:`~her2_monai.losses.HER2Loss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from her2_monai.constants import NUM_CLASSES, STAINS
from her2_monai.networks.attention import ModalitySensitiveAttention
from her2_monai.networks.encoders import DisentangledEncoder
from her2_monai.networks.record import RecordedNetwork
from her2_monai.networks.unfreeze import DEFAULT_FROZEN_STAGES, HYBRID_UNFREEZING_AUTO
from her2_monai.stain_batch import check_stain_inputs, scenario_ids

__all__ = ["MISSING_STRATEGIES", "DualPoolHead", "HER2FlexibleNet"]

MISSING_STRATEGIES: tuple[str, ...] = ("cmgan", "feature_substitution")


class DualPoolHead(nn.Module):
    """Global-average-pool branch and global-max-pool branch, concatenated, then dropout and a linear classifier.

    Args:
        in_channels: feature width ``C``.
        num_classes: number of logits.
        dropout: dropout probability before the linear layer (kept as a module so MC-dropout can re-enable it).
    """

    def __init__(self, in_channels: int, num_classes: int = NUM_CLASSES, dropout: float = 0.3) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * in_channels, num_classes)

    @staticmethod
    def embed(x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, 2C)``: average-pooled then max-pooled features."""
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, 2C)`` embedding -> ``(B, num_classes)`` logits (dropout applies in train mode)."""
        return self.fc(self.dropout(embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, num_classes)`` logits."""
        return self.classify(self.embed(x))


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def _freeze(module: nn.Module) -> None:
    if callable(getattr(module, "freeze", None)):
        module.freeze()
    else:
        module.requires_grad_(False)
    module.eval()


class HER2FlexibleNet(RecordedNetwork, nn.Module):
    """HER2 score classifier that takes H&E, IHC or both per sample (MM'25 framework with ShaSpec encoders).

    **Missing stains.** ``missing_strategy="cmgan"``: the frozen :class:`~her2_monai.networks.cmgan.CrossModalGAN`
    generates the missing stain from the available one and both images go through the encoders (the paper's path).
    ``"feature_substitution"`` (ShaSpec, cheaper, no GAN): the available stain's image stands in for the missing one,
    so the missing stain's *shared* feature is exactly the available stain's shared feature; its *specific* feature is
    zero (``substitute_specific="zero"``, the default: a missing stain contributes no stain-specific evidence) or the
    available stain's specific feature (``"available"``). In the substitution path the missing slot's specific encoder
    still runs (on the other stain's image) so the batch stays one dense tensor (traceable, every parameter used);
    in train mode that image also enters that encoder's BatchNorm statistics.

    **Branch selector.** The frozen :class:`~her2_monai.networks.selector.BranchSelector` of the framework, when
    given, is part of the model so that one weights file serves deployment; :meth:`forward` does not use it (stains
    are declared there). :class:`~her2_monai.inference.deploy.HER2Deploy` uses it to route images of unknown stain.

    **Frozen parts.** The CM-GAN and the selector are frozen (``requires_grad=False``, always eval, synthesis under
    ``no_grad``). Hybrid unfreezing freezes the shared ResNet's stem, ``layer1`` and ``layer2`` (their BatchNorm in
    eval mode too) when it starts from pretrained weights, see
    :func:`~her2_monai.networks.unfreeze.freeze_resnet_stages`. Give the optimizer :meth:`trainable_parameters`.

    **Record.** The constructor arguments that shape the weights are saved in the state dict
    (:class:`~her2_monai.networks.record.RecordedNetwork`), as are those of the CM-GAN and the selector, so
    :func:`~her2_monai.networks.factory.build_network_from_state` rebuilds the network from a weights file alone.

    Args:
        num_classes: HER2 classes.
        in_channels: channels per stain image.
        shared_backbone: shared ResNet (``"resnet50"``; tests use ``"resnet18"``).
        specific_backbone: per-stain encoder (``"efficientnet-b0"``, standing in for MM'25's MobileNetV3; any ResNet
            name also works).
        fusion_channels: fused feature width per stain (``None``: the shared width; 512 keeps the 3x3 fusion
            convolution small next to a 2048-wide ResNet50, see :class:`~her2_monai.networks.encoders.ResidualFusion`).
        attention_channels: per-stain width after the attention's 1x1 compression.
        attention_reduction: channel-attention MLP reduction.
        spatial_attention: use CBAM spatial attention after channel attention.
        spatial_kernel_size: its kernel size.
        modality_attention: the CBAM modality-sensitive attention (``False``: the ablation without it -- the stains'
            compressed fused features are concatenated with equal weight; ``spatial_attention`` is then ignored).
        dropout: dropout before the final linear layer.
        hybrid_unfreezing: freeze ``frozen_stages`` of the shared ResNet: ``"auto"`` (default) only when it starts
            from ``pretrained_weights``; ``True`` or ``False`` force it.
        frozen_stages: stages frozen by hybrid unfreezing.
        pretrained_weights: torchvision-style ResNet state dict (path or mapping) for the shared encoder (``None``:
            random); see :class:`~her2_monai.networks.pretrained.PretrainedWeights` for ImageNet weights.
        cmgan: a ``CrossModalGAN`` (its generators ``he_to_ihc`` and ``ihc_to_he``), required by ``"cmgan"``.
        selector: the branch selector (``(B, 3, H, W) -> (B, 2)`` stain logits), kept frozen; optional.
        missing_strategy: ``"cmgan"``, ``"feature_substitution"``, or ``None`` = ``"cmgan"`` if ``cmgan`` is given,
            otherwise ``"feature_substitution"``.
        substitute_specific: ``"zero"`` or ``"available"`` (feature substitution only).
        freeze_cmgan: freeze the CM-GAN (stage 2 of the training recipe).
        channels_last: store weights and run convolutions in ``torch.channels_last``.
        metadata: facts about the training run saved with the weights (profile, image size, dataset).
        specific_pretrained_weights: torchvision state dict (path or mapping) for each specific encoder, e.g.
            ImageNet EfficientNet-B0 (``None``: random). Like ``pretrained_weights``, not part of the record.

    Raises:
        ValueError: for unknown options, or ``missing_strategy="cmgan"`` without a ``cmgan``.

    Example::

        net = HER2FlexibleNet(cmgan=CrossModalGAN())
        out = net(he, ihc, mask)  # he, ihc (B, 3, H, W) in [-1, 1]; mask (B, 2)
        terms = HER2Loss()(out, label, mask)  # {"loss", "ce", "dao", "dco"}
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        in_channels: int = 3,
        shared_backbone: str = "resnet50",
        specific_backbone: str = "efficientnet-b0",
        fusion_channels: int | None = 512,
        attention_channels: int = 256,
        attention_reduction: int = 16,
        spatial_attention: bool = True,
        spatial_kernel_size: int = 7,
        modality_attention: bool = True,
        dropout: float = 0.3,
        hybrid_unfreezing: bool | str = HYBRID_UNFREEZING_AUTO,
        frozen_stages: Sequence[str] = DEFAULT_FROZEN_STAGES,
        pretrained_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
        cmgan: nn.Module | None = None,
        selector: nn.Module | None = None,
        missing_strategy: str | None = None,
        substitute_specific: str = "zero",
        freeze_cmgan: bool = True,
        channels_last: bool = False,
        metadata: Mapping[str, Any] | None = None,
        specific_pretrained_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if missing_strategy is None:
            missing_strategy = "cmgan" if cmgan is not None else "feature_substitution"
        if missing_strategy not in MISSING_STRATEGIES:
            raise ValueError(f"missing_strategy must be one of {MISSING_STRATEGIES}, got '{missing_strategy}'")
        if missing_strategy == "cmgan":
            if cmgan is None:
                raise ValueError(
                    "missing_strategy='cmgan' needs a CrossModalGAN (cmgan=...); or use "
                    "missing_strategy='feature_substitution'"
                )
            for name in ("he_to_ihc", "ihc_to_he"):
                if not isinstance(getattr(cmgan, name, None), nn.Module):
                    raise ValueError(f"cmgan must have a '{name}' generator submodule (a CrossModalGAN)")
        if substitute_specific not in ("zero", "available"):
            raise ValueError(f"substitute_specific must be 'zero' or 'available', got '{substitute_specific}'")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.missing_strategy = missing_strategy
        self.substitute_specific = substitute_specific
        self.channels_last = bool(channels_last)
        self.freeze_cmgan = bool(freeze_cmgan)

        self.encoder = DisentangledEncoder(
            shared_backbone=shared_backbone,
            specific_backbone=specific_backbone,
            in_channels=in_channels,
            stains=STAINS,
            fusion_channels=fusion_channels,
            hybrid_unfreezing=hybrid_unfreezing,
            frozen_stages=frozen_stages,
            pretrained_weights=pretrained_weights,
            specific_pretrained_weights=specific_pretrained_weights,
        )
        self.attention = ModalitySensitiveAttention(
            self.encoder.out_channels,
            num_stains=len(STAINS),
            compressed_channels=attention_channels,
            reduction=attention_reduction,
            spatial_attention=spatial_attention and modality_attention,
            spatial_kernel_size=spatial_kernel_size,
            channel_attention=modality_attention,
        )
        self.head = DualPoolHead(self.attention.out_channels, num_classes, dropout)

        self.cmgan = cmgan
        if cmgan is not None and self.freeze_cmgan:
            _freeze(cmgan)
        self.selector = selector
        if selector is not None:
            _freeze(selector)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.record_architecture(
            metadata,
            num_classes=num_classes,
            in_channels=in_channels,
            shared_backbone=shared_backbone,
            specific_backbone=specific_backbone,
            fusion_channels=fusion_channels,
            attention_channels=attention_channels,
            attention_reduction=attention_reduction,
            spatial_attention=spatial_attention,
            spatial_kernel_size=spatial_kernel_size,
            modality_attention=modality_attention,
            dropout=dropout,
            missing_strategy=missing_strategy,
            substitute_specific=substitute_specific,
        )

    # ------------------------------------------------------------------------------------------------ utilities
    def train(self, mode: bool = True) -> HER2FlexibleNet:
        """Set train/eval mode; the frozen CM-GAN and selector stay in eval mode (frozen ResNet stages handle their
        BatchNorm).

        Args:
            mode: requested mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        if self.cmgan is not None and self.freeze_cmgan:
            self.cmgan.eval()
        if self.selector is not None:
            self.selector.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad (excludes the frozen CM-GAN, selector and ResNet stages)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _synthesize(self, he: torch.Tensor, ihc: torch.Tensor, available: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cmgan = self.cmgan
        if not _is_tracing() and callable(getattr(cmgan, "synthesize", None)):
            # Eager: the CM-GAN runs each generator only on the samples that need it.
            return cmgan.synthesize(he, ihc, available.to(he.dtype))
        # Traced: data-dependent subsets would be frozen into the graph, so both generators run on the whole batch.
        return cmgan.synthesize_dense(he, ihc, available)

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, he: torch.Tensor | None, ihc: torch.Tensor | None, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classify a batch in which each sample has H&E, IHC or both.

        Args:
            he: ``(B, C, H, W)`` H&E in ``[-1, 1]`` (zeros where missing), or ``None`` if no sample has H&E.
            ihc: ``(B, C, H, W)`` IHC in ``[-1, 1]``, or ``None``.
            mask: ``(B, 2)`` availability, 0/1; column 0 = H&E, column 1 = IHC.

        Returns:
            A dict of tensors: ``logits`` ``(B, num_classes)``; ``scenario`` ``(B,)`` long (0 dual, 1 H&E-only,
            2 IHC-only); ``channel_attention`` ``(B, 2 * attention_channels)`` (H&E block then IHC block);
            ``spatial_attention`` ``(B, 1, h, w)`` (all ones when disabled); ``stain_attention`` ``(B, 2)``: mean
            channel weight of the H&E and IHC blocks; ``shared_he``, ``shared_ihc`` ``(B, C_shared, h, w)``;
            ``specific_he``, ``specific_ihc`` ``(B, C_specific, h, w)`` (after substitution); ``specific_logits_he``,
            ``specific_logits_ihc`` ``(B, 2)`` (DCO stain classifier on each specific encoder's output);
            ``embedding`` ``(B, 4 * attention_channels)`` (pooled features before dropout and the final layer, for
            MC-dropout); ``he_input``, ``ihc_input`` ``(B, C, H, W)``: the images that were encoded (synthesised or
            substituted ones for missing stains).

        Raises:
            ValueError: for an invalid batch (see :func:`~her2_monai.stain_batch.check_stain_inputs`).
        """
        he, ihc, available = check_stain_inputs(he, ihc, mask, self.in_channels)
        return self.forward_available(he, ihc, available)

    def forward_available(
        self, he: torch.Tensor, ihc: torch.Tensor, available: torch.Tensor, all_available: bool = False
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` without input validation, for callers that build valid inputs themselves.

        Args:
            he: ``(B, C, H, W)``.
            ihc: ``(B, C, H, W)``.
            available: ``(B, 2)`` bool availability.
            all_available: the caller guarantees every stain is present (skips synthesis/substitution entirely).

        Returns:
            See :meth:`forward`.
        """
        he_avail, ihc_avail = available[:, 0], available[:, 1]
        scenario = scenario_ids(available)
        if self.channels_last:
            he = he.contiguous(memory_format=torch.channels_last)
            ihc = ihc.contiguous(memory_format=torch.channels_last)

        substitute = self.missing_strategy == "feature_substitution" and not all_available
        if all_available:
            he_in, ihc_in = he, ihc
        elif self.missing_strategy == "cmgan":
            he_in, ihc_in = self._synthesize(he, ihc, available)
        else:
            he_in = torch.where(he_avail[:, None, None, None], he, ihc)
            ihc_in = torch.where(ihc_avail[:, None, None, None], ihc, he)

        shared, specific = self.encoder.encode([he_in, ihc_in])
        specific_logits = self.encoder.stain_logits(specific)
        if substitute:
            keep_he, keep_ihc = he_avail[:, None, None, None], ihc_avail[:, None, None, None]
            if self.substitute_specific == "zero":
                specific = [specific[0] * keep_he.to(specific[0].dtype), specific[1] * keep_ihc.to(specific[1].dtype)]
            else:
                specific = [
                    torch.where(keep_he, specific[0], specific[1]),
                    torch.where(keep_ihc, specific[1], specific[0]),
                ]
        fused = self.encoder.fuse(shared, specific)
        features, channel_weights, spatial_weights = self.attention(torch.cat(fused, dim=1))
        if spatial_weights is None:
            spatial_weights = features.new_ones((features.shape[0], 1, features.shape[2], features.shape[3]))
        embedding = self.head.embed(features)
        return {
            "logits": self.head.classify(embedding),
            "scenario": scenario,
            "channel_attention": channel_weights,
            "spatial_attention": spatial_weights,
            "stain_attention": self.attention.stain_weights(channel_weights),
            "shared_he": shared[0],
            "shared_ihc": shared[1],
            "specific_he": specific[0],
            "specific_ihc": specific[1],
            "specific_logits_he": specific_logits[0],
            "specific_logits_ihc": specific_logits[1],
            "embedding": embedding,
            "he_input": he_in,
            "ihc_input": ihc_in,
        }
