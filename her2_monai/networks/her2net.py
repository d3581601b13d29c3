"""HER2FlexibleNet: the MM'25 HER2 classifier for H&E, IHC or both, and its one-tensor deployment wrapper.

Pipeline per batch (SPEC section 3): fill each missing stain (frozen CM-GAN synthesis, or ShaSpec feature
substitution) -> shared ResNet + stain-specific encoders -> residual fusion per stain -> modality-sensitive (CBAM)
attention over both stains -> GAP + global-max-pool head -> 4 HER2 logits. The ShaSpec DAO/DCO auxiliary losses are
computed from the returned features by :meth:`HER2FlexibleNet.auxiliary_losses`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from her2_monai.constants import DUAL, HE_ONLY, IHC_ONLY, NUM_CLASSES, STAINS
from her2_monai.losses.disentangle import DisentanglementLoss
from her2_monai.networks.attention import ModalitySensitiveAttention
from her2_monai.networks.encoders import DisentangledEncoder
from her2_monai.networks.unfreeze import DEFAULT_FROZEN_STAGES

__all__ = ["MISSING_STRATEGIES", "AUXILIARY_SAMPLES", "DualPoolHead", "HER2FlexibleNet", "HER2DeployNet"]

MISSING_STRATEGIES: tuple[str, ...] = ("cmgan", "feature_substitution")
AUXILIARY_SAMPLES: tuple[str, ...] = ("dual", "real", "all")


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


class HER2FlexibleNet(nn.Module):
    """HER2 score classifier that takes H&E, IHC or both per sample (MM'25 framework with ShaSpec encoders).

    **Missing stains.** ``missing_strategy="cmgan"``: the frozen :class:`~her2_monai.networks.cmgan.CrossModalGAN`
    generates the missing stain from the available one and both images go through the encoders (the paper's path).
    ``"feature_substitution"`` (ShaSpec, cheaper, no GAN): the available stain's image stands in for the missing one,
    so the missing stain's *shared* feature is exactly the available stain's shared feature; its *specific* feature is
    zero (``substitute_specific="zero"``, the default: a missing stain contributes no stain-specific evidence) or the
    available stain's specific feature (``"available"``). In the substitution path the missing slot's specific encoder
    still runs (on the other stain's image) so the batch stays one dense tensor (traceable, every parameter used);
    in train mode that image also enters that encoder's BatchNorm statistics.

    **Auxiliary losses** (:meth:`auxiliary_losses`): DAO on the shared features and DCO on the specific features,
    weighted 0.1 and 0.02. ``auxiliary_samples`` chooses the samples: ``"dual"`` (default; SPEC: "only over samples
    where both stains are present", i.e. both *real*: aligning a real H&E with an IHC synthesised from it, or with
    itself under substitution, would reward the shortcut of the GAN, not stain invariance), ``"real"`` (DAO on dual
    samples, DCO on every real stain image, which gives DCO more data), or ``"all"`` (synthetic/substituted included).

    **Frozen parts.** The CM-GAN is frozen (``requires_grad=False``, always eval, synthesis under ``no_grad``).
    Hybrid unfreezing freezes the shared ResNet's stem, ``layer1`` and ``layer2`` (their BatchNorm in eval mode too),
    see :func:`~her2_monai.networks.unfreeze.freeze_resnet_stages`. Give the optimizer
    :meth:`trainable_parameters`.

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
        dropout: dropout before the final linear layer.
        hybrid_unfreezing: freeze ``frozen_stages`` of the shared ResNet.
        frozen_stages: stages frozen by hybrid unfreezing.
        pretrained_weights: path of a torchvision-style ResNet state dict for the shared encoder (``None``: random).
        cmgan: a ``CrossModalGAN`` (its generators ``he_to_ihc`` and ``ihc_to_he``), required by ``"cmgan"``.
        missing_strategy: ``"cmgan"``, ``"feature_substitution"``, or ``None`` = ``"cmgan"`` if ``cmgan`` is given,
            otherwise ``"feature_substitution"``.
        substitute_specific: ``"zero"`` or ``"available"`` (feature substitution only).
        freeze_cmgan: freeze the CM-GAN (stage 2 of the training recipe).
        dao_weight: DAO weight.
        dco_weight: DCO weight.
        dao_mode: ``"l1"`` (ShaSpec) or ``"mmd"`` (MM'25 text).
        dao_pooled: DAO on globally pooled shared features (default) or on full maps.
        auxiliary_samples: ``"dual"``, ``"real"`` or ``"all"`` (see above).
        channels_last: store weights and run convolutions in ``torch.channels_last`` (faster on CPUs with AMX/AVX-512
            and on GPUs with AMP).

    Raises:
        ValueError: for unknown options, or ``missing_strategy="cmgan"`` without a ``cmgan``.

    Example::

        net = HER2FlexibleNet(cmgan=CrossModalGAN())
        out = net(he, ihc, mask)  # he, ihc (B, 3, H, W) in [-1, 1]; mask (B, 2)
        loss = ce(out["logits"], label) + sum(net.auxiliary_losses(out, mask).values())
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
        dropout: float = 0.3,
        hybrid_unfreezing: bool = True,
        frozen_stages: Sequence[str] = DEFAULT_FROZEN_STAGES,
        pretrained_weights: str | Path | None = None,
        cmgan: nn.Module | None = None,
        missing_strategy: str | None = None,
        substitute_specific: str = "zero",
        freeze_cmgan: bool = True,
        dao_weight: float = 0.1,
        dco_weight: float = 0.02,
        dao_mode: str = "l1",
        dao_pooled: bool = True,
        auxiliary_samples: str = "dual",
        channels_last: bool = False,
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
        if auxiliary_samples not in AUXILIARY_SAMPLES:
            raise ValueError(f"auxiliary_samples must be one of {AUXILIARY_SAMPLES}, got '{auxiliary_samples}'")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.missing_strategy = missing_strategy
        self.substitute_specific = substitute_specific
        self.auxiliary_samples = auxiliary_samples
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
        )
        self.attention = ModalitySensitiveAttention(
            self.encoder.out_channels,
            num_stains=len(STAINS),
            compressed_channels=attention_channels,
            reduction=attention_reduction,
            spatial_attention=spatial_attention,
            spatial_kernel_size=spatial_kernel_size,
        )
        self.head = DualPoolHead(self.attention.out_channels, num_classes, dropout)
        self.disentangle_loss = DisentanglementLoss(dao_weight, dco_weight, dao_mode, dao_pooled)

        self.cmgan = cmgan
        if cmgan is not None and self.freeze_cmgan:
            if callable(getattr(cmgan, "freeze", None)):
                cmgan.freeze()
            else:
                cmgan.requires_grad_(False)
            cmgan.eval()
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------------ utilities
    def train(self, mode: bool = True) -> HER2FlexibleNet:
        """Set train/eval mode; a frozen CM-GAN stays in eval mode (frozen ResNet stages handle their BatchNorm).

        Args:
            mode: requested mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        if self.cmgan is not None and self.freeze_cmgan:
            self.cmgan.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad (excludes the frozen CM-GAN and the frozen ResNet stages)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _check_inputs(
        self, he: torch.Tensor | None, ihc: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a (B, 2) tensor (column 0 = H&E, column 1 = IHC available), got {shape}")
        if he is None and ihc is None:
            raise ValueError("at least one of he / ihc must be a tensor")
        expected = f"(B={mask.shape[0]}, {self.in_channels}, H, W)"
        for name, image in (("he", he), ("ihc", ihc)):
            if image is None:
                continue
            if not isinstance(image, torch.Tensor) or image.ndim != 4:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"{name} must be a {expected} tensor, got {shape}")
            if image.shape[0] != mask.shape[0] or image.shape[1] != self.in_channels:
                raise ValueError(
                    f"{name} must be {expected} to match the mask and in_channels, got {tuple(image.shape)}"
                )
            if not image.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got {image.dtype}")
        if he is not None and ihc is not None and he.shape != ihc.shape:
            raise ValueError(f"he and ihc must have the same shape, got {tuple(he.shape)} and {tuple(ihc.shape)}")
        available = mask > 0.5
        if not _is_tracing():  # data-dependent checks cannot be part of a traced graph
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold only 0 (missing) and 1 (available)")
            empty = (~available.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"every sample needs at least one stain; samples {empty} have neither H&E nor IHC")
            for name, image, column in (("he", he, 0), ("ihc", ihc, 1)):
                if image is None and bool(available[:, column].any()):
                    raise ValueError(f"the mask marks {name} available for some samples but {name} is None")
        he = he if he is not None else torch.zeros_like(ihc)
        ihc = ihc if ihc is not None else torch.zeros_like(he)
        return he, ihc, available

    def _synthesize(self, he: torch.Tensor, ihc: torch.Tensor, available: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cmgan = self.cmgan
        if not _is_tracing() and callable(getattr(cmgan, "synthesize", None)):
            # Eager: the CM-GAN runs each generator only on the samples that need it.
            return cmgan.synthesize(he, ihc, available.to(he.dtype))
        # Traced: data-dependent subsets would be frozen into the graph, so both generators run on the whole batch
        # and the real stain is selected per sample (same result: the frozen generators are in eval mode).
        frozen = not any(p.requires_grad for p in cmgan.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            fake_he = cmgan.ihc_to_he(ihc).to(he.dtype)
            fake_ihc = cmgan.he_to_ihc(he).to(ihc.dtype)
        he_in = torch.where(available[:, 0, None, None, None], he, fake_he)
        ihc_in = torch.where(available[:, 1, None, None, None], ihc, fake_ihc)
        return he_in, ihc_in

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
            ValueError: for a mask that is not ``(B, 2)`` of 0/1, a sample with no stain, wrong channel count, or
                images whose shapes do not match each other or the mask.
        """
        he, ihc, available = self._check_inputs(he, ihc, mask)
        return self.forward_available(he, ihc, available)

    def forward_available(
        self, he: torch.Tensor, ihc: torch.Tensor, available: torch.Tensor, all_available: bool = False
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` without input validation, for wrappers that build valid inputs themselves.

        Args:
            he: ``(B, C, H, W)``.
            ihc: ``(B, C, H, W)``.
            available: ``(B, 2)`` bool availability.
            all_available: the caller guarantees every stain is present (skips synthesis/substitution entirely).

        Returns:
            See :meth:`forward`.
        """
        he_avail, ihc_avail = available[:, 0], available[:, 1]
        scenario = torch.where(
            he_avail & ihc_avail,
            torch.full_like(he_avail, DUAL, dtype=torch.long),
            torch.where(
                he_avail,
                torch.full_like(he_avail, HE_ONLY, dtype=torch.long),
                torch.full_like(he_avail, IHC_ONLY, dtype=torch.long),
            ),
        )
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

    def auxiliary_losses(
        self, outputs: dict[str, torch.Tensor], mask: torch.Tensor, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted ShaSpec losses for the trainer to add to the class-weighted cross-entropy.

        Args:
            outputs: the dict returned by :meth:`forward`.
            mask: the ``(B, 2)`` availability mask given to :meth:`forward`.
            label: unused (the common classifier interface passes it).

        Returns:
            ``{"dao": 0.1 * DAO, "dco": 0.02 * DCO}`` (the configured weights), float32 scalars; zero, still connected
            to the graph, when no sample qualifies (see ``auxiliary_samples``).

        Raises:
            KeyError: if ``outputs`` lacks the features the losses need.
            ValueError: if ``mask`` is not ``(B, 2)``.
        """
        needed = ("shared_he", "shared_ihc", "specific_logits_he", "specific_logits_ihc")
        missing = [k for k in needed if k not in outputs]
        if missing:
            raise KeyError(f"outputs lack {missing}; pass the dict returned by HER2FlexibleNet.forward")
        if mask.ndim != 2 or mask.shape[1] != 2:
            raise ValueError(f"mask must be (B, 2), got {tuple(mask.shape)}")
        available = mask > 0.5
        dual = available.all(dim=1)
        if self.auxiliary_samples == "dual":
            dao_mask, dco_mask = dual, dual
        elif self.auxiliary_samples == "real":
            dao_mask, dco_mask = dual, available
        else:
            dao_mask = dco_mask = torch.ones_like(dual)
        return self.disentangle_loss(
            outputs["shared_he"],
            outputs["shared_ihc"],
            [outputs["specific_logits_he"], outputs["specific_logits_ihc"]],
            dao_mask,
            dco_mask,
        )


class HER2DeployNet(nn.Module):
    """One-tensor deployment wrapper: the branch selector routes single-stain images, 6-channel input means dual.

    ``forward(x)``: ``x`` ``(B, 3, H, W)`` holds one image per sample of either stain; the selector decides per sample
    (predicted H&E -> H&E-only path, IHC -> IHC-only path, the missing stain then filled as the network is configured).
    ``(B, 6, H, W)`` holds H&E channels then IHC channels (dual). Tensor in, tensor out, so ``torch.jit.trace`` and
    MONAI's ``verify_net_in_out`` work. A trace is specific to the channel count it was traced with (3 or 6); inside
    a 3-channel trace the selector's per-sample routing stays dynamic. Call ``eval()`` before tracing or serving.

    Args:
        flexible_net: a :class:`HER2FlexibleNet`.
        selector: a module mapping ``(B, 3, H, W)`` to ``(B, 2)`` stain logits (0 = H&E, 1 = IHC), e.g.
            :class:`~her2_monai.networks.selector.BranchSelector`.
    """

    def __init__(self, flexible_net: HER2FlexibleNet, selector: nn.Module) -> None:
        super().__init__()
        self.net = flexible_net
        self.selector = selector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict HER2 logits.

        Args:
            x: ``(B, C, H, W)`` (single stain, routed by the selector) or ``(B, 2C, H, W)`` (H&E then IHC), in
                ``[-1, 1]``, with ``C = flexible_net.in_channels``.

        Returns:
            ``(B, num_classes)`` logits.

        Raises:
            ValueError: for any other shape.
        """
        c = self.net.in_channels
        if x.ndim != 4 or x.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"expected (B, {c}, H, W) single-stain or (B, {2 * c}, H, W) H&E+IHC input, got {tuple(x.shape)}"
            )
        if x.shape[1] == 2 * c:
            available = torch.ones((x.shape[0], 2), dtype=torch.bool, device=x.device)
            return self.net.forward_available(x[:, :c], x[:, c:], available, all_available=True)["logits"]
        is_ihc = self.selector(x).argmax(dim=1) == 1
        available = torch.stack([~is_ihc, is_ihc], dim=1)
        zeros = torch.zeros_like(x)
        he = torch.where(is_ihc[:, None, None, None], zeros, x)
        ihc = torch.where(is_ihc[:, None, None, None], x, zeros)
        return self.net.forward_available(he, ihc, available)["logits"]
