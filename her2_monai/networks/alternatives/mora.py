"""MoRA-style modality-aware low-rank adaptation of one shared backbone for H&E / IHC with a missing stain.

After MoRA (missing-modality low-rank adaptation): a single (frozen or partly frozen) backbone encodes every stain,
and small low-rank adapters let it adjust to *which* stains a sample has. Each adapter has a down-projection of rank 4
shared by all missing-modality cases and one zero-initialised up-projection per case (dual / H&E-only / IHC-only); the
sample's scenario picks the up-projection. Because the up-projections start at zero, the untrained model is exactly
the backbone-only model, and adaptation only adds what training finds useful.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from her2_monai.constants import NUM_CLASSES, SCENARIOS, STAINS
from her2_monai.networks.encoders import ResNetTrunk
from her2_monai.networks.record import RecordedNetwork
from her2_monai.stain_batch import apply_to_present, check_stain_inputs, scenario_ids

__all__ = ["ScenarioLowRankAdapter", "MoRANet"]

_FREEZE_MODES = ("auto", "all", "early", "none")


class ScenarioLowRankAdapter(nn.Module):
    """Residual low-rank adapter on a feature map with one up-projection per missing-modality scenario.

    ``y = x + (alpha / rank) * U[s] @ D @ x`` applied per pixel (1x1 convolutions), where ``D`` (``rank x C``) is
    shared by all scenarios and ``U[s]`` (``C x rank``) belongs to scenario ``s`` of the sample. ``D`` gets LoRA's
    Kaiming-uniform init, every ``U[s]`` starts at zero, so the adapter is the identity at initialisation.

    Args:
        channels: feature channels ``C``.
        rank: bottleneck rank ``r`` (MoRA: 4).
        num_scenarios: number of up-projections (3: dual, H&E-only, IHC-only).
        alpha: LoRA scaling numerator (default ``rank``, i.e. scale 1).

    Raises:
        ValueError: if ``channels``, ``rank`` or ``num_scenarios`` is not positive.
    """

    def __init__(self, channels: int, rank: int = 4, num_scenarios: int = len(SCENARIOS), alpha: float | None = None):
        super().__init__()
        if channels < 1 or rank < 1 or num_scenarios < 1:
            raise ValueError(f"channels, rank, num_scenarios must be positive, got {(channels, rank, num_scenarios)}")
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / self.rank
        self.down = nn.Parameter(torch.empty(rank, channels))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(num_scenarios, channels, rank))

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        """Adapt a feature map.

        Args:
            x: ``(B, C, H, W)``.
            scenario: ``(B,)`` long scenario id per sample.

        Returns:
            ``(B, C, H, W)``.

        Raises:
            ValueError: if ``scenario`` does not have one valid id per sample.
        """
        if scenario.shape != (x.shape[0],):
            raise ValueError(f"scenario must have shape ({x.shape[0]},), got {tuple(scenario.shape)}")
        if bool(((scenario < 0) | (scenario >= self.up.shape[0])).any()):
            raise ValueError(f"scenario ids must be in 0..{self.up.shape[0] - 1}")
        z = torch.einsum("rc,bchw->brhw", self.down, x)
        return x + self.scale * torch.einsum("bcr,brhw->bchw", self.up[scenario], z)


class MoRANet(RecordedNetwork, nn.Module):
    """One shared ResNet backbone for both stains, adapted per missing-modality scenario by low-rank adapters.

    Design choices:

    - **Where the adapters go**: after the residual stages listed in ``adapter_stages`` (default all four), as 1x1
      low-rank maps on the stage's output feature map (:class:`ScenarioLowRankAdapter`). Adapting feature maps
      rather than the head lets the low-level stain appearance be re-weighted per scenario at a few thousand
      parameters. The same adapters serve both stains; the scenario (not the stain) selects the up-projection.
    - **Freezing**: ``freeze="all"`` freezes the whole backbone (pure LoRA: only adapters, missing-stain tokens and
      head train, ~82k parameters with ResNet50); ``"early"`` freezes the stem and stages 1-2 and fine-tunes stages
      3-4 (the hybrid unfreezing P001 found best); ``"none"`` trains everything. ``"auto"`` (default) means ``"all"``
      when ``pretrained_weights`` are given and ``"early"`` otherwise, because a frozen *random* backbone (the default
      here, nothing can be downloaded) gives adapters nothing worth adapting. Frozen parts stay in eval mode so their
      BatchNorm statistics do not drift.
    - **Missing stain**: its pooled feature is replaced by a learnt per-stain token (``missing_feature="token"``,
      initialised to zero) or by zeros (``"zeros"``); the backbone never runs on the blank image.
    - **Head**: dropout and a linear layer on the concatenated pooled H&E and IHC features.

    Args:
        num_classes: output classes.
        arch: backbone architecture (see :class:`ResNetTrunk`).
        block_inplanes: backbone stage widths.
        rank: adapter rank (MoRA: 4).
        adapter_stages: which stages (1-4) get an adapter after them.
        freeze: ``"auto"``, ``"all"``, ``"early"`` or ``"none"`` (see above).
        missing_feature: ``"token"`` or ``"zeros"``.
        dropout: dropout before the classifier.
        alpha: LoRA scaling numerator (default ``rank``).
        pretrained_weights: local backbone state dict (torchvision-style keys).
        metadata: facts about the training run saved with the weights.

    Raises:
        ValueError: on an unknown ``freeze``/``missing_feature`` or a stage outside 1-4.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        arch: str = "resnet50",
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        rank: int = 4,
        adapter_stages: Sequence[int] = (1, 2, 3, 4),
        freeze: str = "auto",
        missing_feature: str = "token",
        dropout: float = 0.0,
        alpha: float | None = None,
        pretrained_weights: str | os.PathLike | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if freeze not in _FREEZE_MODES:
            raise ValueError(f"freeze must be one of {_FREEZE_MODES}, got '{freeze}'")
        if missing_feature not in ("token", "zeros"):
            raise ValueError(f"missing_feature must be 'token' or 'zeros', got '{missing_feature}'")
        stages = sorted({int(s) for s in adapter_stages})
        if any(s not in (1, 2, 3, 4) for s in stages):
            raise ValueError(f"adapter_stages must be within 1..4, got {tuple(adapter_stages)}")
        self.backbone = ResNetTrunk(name=arch, block_inplanes=block_inplanes, pretrained_weights=pretrained_weights)
        if freeze == "auto":
            freeze = "all" if pretrained_weights is not None else "early"
        self.freeze = freeze
        self.adapter_stages = tuple(stages)
        self.adapters = nn.ModuleDict(
            {
                str(s): ScenarioLowRankAdapter(self.backbone.stage_channels[s - 1], rank, len(SCENARIOS), alpha)
                for s in stages
            }
        )
        width = self.backbone.out_channels
        self.missing_feature = missing_feature
        if missing_feature == "token":
            self.missing_token = nn.Parameter(torch.zeros(len(STAINS), width))
        else:
            self.register_buffer("missing_token", torch.zeros(len(STAINS), width), persistent=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(len(STAINS) * width, num_classes))
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.record_architecture(
            metadata,
            num_classes=num_classes,
            arch=arch,
            block_inplanes=block_inplanes,
            rank=rank,
            adapter_stages=adapter_stages,
            missing_feature=missing_feature,
            dropout=dropout,
            alpha=alpha,
        )

    def _frozen_modules(self) -> list[nn.Module]:
        net = self.backbone.resnet
        if self.freeze == "all":
            return [self.backbone]
        if self.freeze == "early":
            return [net.conv1, net.bn1, net.layer1, net.layer2]
        return []

    def train(self, mode: bool = True) -> MoRANet:
        """Set training mode, keeping frozen backbone parts in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def encode(self, x: Tensor, scenario: Tensor, adapt: bool = True) -> Tensor:
        """Pooled backbone feature of one stain, adapted for each sample's scenario.

        Args:
            x: ``(N, 3, H, W)`` images of one stain.
            scenario: ``(N,)`` scenario id per sample.
            adapt: apply the adapters (``False`` gives the plain backbone, e.g. to check the zero init).

        Returns:
            ``(N, C)``.
        """
        h = self.backbone.stem(x)
        for index, stage in enumerate(self.backbone.stages, start=1):
            h = stage(h)
            if adapt and index in self.adapter_stages:
                h = self.adapters[str(index)](h, scenario)
        return self.pool(h).flatten(1)

    def forward(self, he: Tensor | None, ihc: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
        """Classify a batch with any mix of available stains.

        Args:
            he: ``(B, 3, H, W)`` H&E in ``[-1, 1]`` (zeros where missing) or ``None``.
            ihc: ``(B, 3, H, W)`` IHC in ``[-1, 1]`` or ``None``.
            mask: ``(B, 2)`` availability (column 0 = H&E, column 1 = IHC).

        Returns:
            ``logits`` ``(B, K)``, ``scenario`` ``(B,)`` and ``features`` ``(B, 2, C)`` (the missing stain's row is
            the missing-feature token), ``embedding`` ``(B, 2C)`` (the head's input).

        Raises:
            ValueError: on bad shapes or a bad mask (see :func:`check_stain_inputs`).
        """
        he, ihc, available = check_stain_inputs(he, ihc, mask)
        scenario = scenario_ids(available)
        features = []
        for column, image in enumerate((he, ihc)):
            token = self.missing_token[column].to(image.dtype).expand(image.shape[0], -1)
            features += apply_to_present(self.encode, available[:, column], [token], image, scenario)
        features_t = torch.stack(features, dim=1)
        embedding = features_t.flatten(1)
        return {"logits": self.head(embedding), "scenario": scenario, "features": features_t, "embedding": embedding}
