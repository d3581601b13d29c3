"""SimMLM-style dynamic mixture of modality experts (DMoME) for H&E / IHC with a missing stain.

After SimMLM (Li, Chen & Han, ICCV 2025): each stain has its own *expert* (a feature trunk and a classifier head), a
*gating network* looks at the available inputs and weighs the experts, and the final prediction is the weighted
mixture of the expert logits. Missing experts get weight exactly zero (a masked softmax), so the same network serves
dual, H&E-only and IHC-only cases without imputing the missing image. Trained with
:class:`~her2_monai.losses.classification.SimMLMLoss`: the class-weighted CE on the mixture plus the MoFe ranking loss
(weight 0.1), which asks the dual prediction to be at least as good as either single-stain prediction.

Experts use :class:`her2_monai.networks.encoders.ResNetTrunk`, the same feature trunk as :class:`HER2FlexibleNet`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from her2_monai.constants import NUM_CLASSES, STAINS
from her2_monai.networks.encoders import ResNetTrunk
from her2_monai.networks.record import RecordedNetwork
from her2_monai.stain_batch import apply_to_present, check_stain_inputs, scenario_ids

__all__ = ["ModalityExpert", "modality_experts", "run_experts", "masked_softmax", "mixture_logits", "SimMLMNet"]


class ModalityExpert(nn.Module):
    """One stain's expert: a :class:`ResNetTrunk`, global average pooling and a linear classifier.

    Args:
        num_classes: output classes.
        dropout: dropout before the classifier.
        trunk_kwargs: arguments for :class:`ResNetTrunk`.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.0, **trunk_kwargs) -> None:
        super().__init__()
        self.trunk = ResNetTrunk(**trunk_kwargs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.trunk.out_channels, num_classes))

    @property
    def out_channels(self) -> int:
        """Width of the pooled feature."""
        return self.trunk.out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``(N, 3, H, W)``.

        Returns:
            ``(features (N, C), logits (N, num_classes))``.
        """
        features = self.pool(self.trunk(x)).flatten(1)
        return features, self.head(features)


def modality_experts(
    num_classes: int,
    dropout: float,
    arch: str,
    block_inplanes: Sequence[int],
    pretrained_weights: str | os.PathLike | None,
) -> nn.ModuleList:
    """One :class:`ModalityExpert` per stain, in :data:`~her2_monai.constants.STAINS` order.

    Args:
        num_classes: output classes of each expert.
        dropout: dropout before each expert's classifier.
        arch: trunk architecture (see :class:`ResNetTrunk`).
        block_inplanes: trunk stage widths.
        pretrained_weights: local state dict loaded into every trunk.

    Returns:
        The experts.
    """
    trunk = {"name": arch, "block_inplanes": block_inplanes, "pretrained_weights": pretrained_weights}
    return nn.ModuleList([ModalityExpert(num_classes, dropout, **trunk) for _ in STAINS])


def run_experts(
    experts: Sequence[nn.Module], images: Sequence[Tensor], available: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Run one :class:`ModalityExpert` per stain on the samples that have that stain.

    Args:
        experts: one expert per stain, in :data:`~her2_monai.constants.STAINS` order.
        images: one ``(B, 3, H, W)`` batch per stain.
        available: ``(B, len(experts))`` bool availability.
        num_classes: output classes of each expert.

    Returns:
        ``features`` ``(B, E, C)`` and ``logits`` ``(B, E, K)``, zeros where a stain is missing.
    """
    batch = available.shape[0]
    features, logits = [], []
    for column, (expert, image) in enumerate(zip(experts, images)):
        fills = [image.new_zeros(batch, expert.out_channels), image.new_zeros(batch, num_classes)]
        feat, logit = apply_to_present(expert, available[:, column], fills, image)
        features.append(feat)
        logits.append(logit)
    return torch.stack(features, dim=1), torch.stack(logits, dim=1)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dimension restricted to ``mask > 0``; masked entries get exactly zero.

    Args:
        logits: ``(B, M)``.
        mask: ``(B, M)``; every row needs at least one non-zero entry.

    Returns:
        ``(B, M)`` weights, each row summing to 1.
    """
    return logits.masked_fill(mask <= 0, float("-inf")).softmax(dim=-1)


def mixture_logits(expert_logits: Tensor, gate_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mix expert logits with gate weights restricted to the experts ``mask`` makes available.

    Evaluating this with a reduced mask (one expert masked out) gives the prediction the mixture would make with fewer
    stains; with a single available expert it reduces to that expert's logits, whatever the gate says.

    Args:
        expert_logits: ``(B, M, K)``.
        gate_logits: ``(B, M)``.
        mask: ``(B, M)`` availability.

    Returns:
        ``(logits (B, K), weights (B, M))``.
    """
    weights = masked_softmax(gate_logits, mask)
    # Zero the logits of unavailable experts first so a -inf/NaN there cannot leak into the sum as 0 * inf.
    expert_logits = expert_logits * (mask > 0).unsqueeze(-1).to(expert_logits.dtype)
    return (weights.unsqueeze(-1) * expert_logits).sum(dim=1), weights


class SimMLMNet(RecordedNetwork, nn.Module):
    """Dynamic mixture of modality experts with a learnt, availability-masked gate.

    Design choices (where SimMLM leaves them open):

    - **Experts**: one :class:`ModalityExpert` per stain (no weight sharing), each seeing only its own stain. An
      expert runs only on the samples that have its stain, so single-stain batches cost one trunk pass.
    - **Gate input**: the concatenated pooled expert features (zeros for a missing stain) plus the availability mask,
      through a two-layer MLP -> one score per expert. Reusing the expert features keeps the gate cheap; the paper's
      gate sees "the same inputs" as the experts, which these features summarise.
    - **Mixture**: at the logit level, ``logits = sum_m w_m * expert_logits_m`` with ``w = masked_softmax(gate, mask)``.
    - **Single-stain predictions of a dual sample** (needed by MoFe) are the mixture re-evaluated with one expert
      masked (:func:`mixture_logits` with the reduced mask), which equals that expert's logits (``expert_logits``):
      no second forward pass.

    Args:
        num_classes: output classes (HER2 scores).
        arch: trunk architecture of each expert (a key of :data:`~her2_monai.networks.encoders.RESNET_ARCHS`;
            default ``"resnet50"``, the family of the main model, so comparisons are like for like; ``"resnet18"`` is
            a lighter option).
        block_inplanes: trunk stage widths (see :class:`ResNetTrunk`).
        gate_hidden: hidden width of the gating MLP.
        dropout: dropout before each expert's classifier.
        pretrained_weights: local state dict loaded into both expert trunks.
        metadata: facts about the training run saved with the weights.

    Raises:
        ValueError: on bad sizes (see :class:`ResNetTrunk`).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        arch: str = "resnet50",
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        gate_hidden: int = 128,
        dropout: float = 0.0,
        pretrained_weights: str | os.PathLike | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.experts = modality_experts(num_classes, dropout, arch, block_inplanes, pretrained_weights)
        width = self.experts[0].out_channels
        self.gate = nn.Sequential(
            nn.Linear(len(STAINS) * width + len(STAINS), gate_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(gate_hidden, len(STAINS)),
        )
        self.record_architecture(
            metadata,
            num_classes=num_classes,
            arch=arch,
            block_inplanes=block_inplanes,
            gate_hidden=gate_hidden,
            dropout=dropout,
        )

    def forward(self, he: Tensor | None, ihc: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
        """Classify a batch with any mix of available stains.

        Args:
            he: ``(B, 3, H, W)`` H&E in ``[-1, 1]`` (zeros where missing) or ``None``.
            ihc: ``(B, 3, H, W)`` IHC in ``[-1, 1]`` or ``None``.
            mask: ``(B, 2)`` availability (column 0 = H&E, column 1 = IHC).

        Returns:
            ``logits`` ``(B, K)`` (the mixture), ``scenario`` ``(B,)``, ``gate_weights`` ``(B, 2)`` (zero for a
            missing stain, rows sum to 1), ``gate_logits`` ``(B, 2)``, ``expert_logits`` ``(B, 2, K)`` (zeros for a
            missing stain), ``features`` ``(B, 2, C)`` and
            ``embedding`` ``(B, 2C)`` (flattened features, for the out-of-distribution score).

        Raises:
            ValueError: on bad shapes or a bad mask (see :func:`check_stain_inputs`).
        """
        he, ihc, available = check_stain_inputs(he, ihc, mask)
        scenario = scenario_ids(available)
        mask = available.to(he.dtype)
        features_t, expert_logits = run_experts(self.experts, (he, ihc), available, self.num_classes)
        gate_logits = self.gate(torch.cat([features_t.flatten(1), mask], dim=1))
        mixed, weights = mixture_logits(expert_logits, gate_logits, mask)
        return {
            "logits": mixed,
            "scenario": scenario,
            "gate_weights": weights,
            "gate_logits": gate_logits,
            "expert_logits": expert_logits,
            "features": features_t,
            "embedding": features_t.flatten(1),
        }
