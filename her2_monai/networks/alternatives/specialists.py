"""Single-stain specialists: one classifier per stain, no sharing -- the simplest answer to a missing stain.

The baseline the MM'25 paper reports as "H&E-only" and "IHC-only", in the same harness as the other methods: each
stain has its own :class:`~her2_monai.networks.alternatives.simmlm.ModalityExpert` (a ResNet trunk, pooling and a
linear classifier), trained only on images of its stain
(:class:`~her2_monai.losses.classification.SpecialistLoss`). A sample is classified by the specialists of the stains it
has; with both stains, their logits are averaged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from her2_monai.constants import NUM_CLASSES
from her2_monai.networks.alternatives.simmlm import modality_experts, run_experts
from her2_monai.networks.record import RecordedNetwork
from her2_monai.stain_batch import check_stain_inputs, scenario_ids

__all__ = ["StainSpecialists"]


class StainSpecialists(RecordedNetwork, nn.Module):
    """One :class:`ModalityExpert` per stain; the logits of a sample are the mean over the stains it has.

    Args:
        num_classes: output classes.
        arch: trunk architecture of each specialist (see :class:`~her2_monai.networks.encoders.ResNetTrunk`).
        block_inplanes: trunk stage widths.
        dropout: dropout before each specialist's classifier.
        pretrained_weights: local state dict loaded into both trunks.
        metadata: facts about the training run saved with the weights.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        arch: str = "resnet50",
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        dropout: float = 0.0,
        pretrained_weights: str | os.PathLike | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.experts = modality_experts(num_classes, dropout, arch, block_inplanes, pretrained_weights)
        self.record_architecture(
            metadata, num_classes=num_classes, arch=arch, block_inplanes=block_inplanes, dropout=dropout
        )

    def forward(self, he: Tensor | None, ihc: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
        """Classify a batch with any mix of available stains.

        Args:
            he: ``(B, 3, H, W)`` H&E in ``[-1, 1]`` (zeros where missing) or ``None``.
            ihc: ``(B, 3, H, W)`` IHC in ``[-1, 1]`` or ``None``.
            mask: ``(B, 2)`` availability (column 0 = H&E, column 1 = IHC).

        Returns:
            ``logits`` ``(B, K)`` (mean over the available specialists), ``scenario`` ``(B,)`` and ``expert_logits``
            ``(B, 2, K)`` (zeros for a missing stain) and ``embedding`` ``(B, 2D)`` (both specialists' pooled features).

        Raises:
            ValueError: on bad shapes or a bad mask (see :func:`~her2_monai.stain_batch.check_stain_inputs`).
        """
        he, ihc, available = check_stain_inputs(he, ihc, mask)
        features, expert_logits = run_experts(self.experts, (he, ihc), available, self.num_classes)
        weights = available.to(expert_logits.dtype)
        mean = (expert_logits * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        # The pooled features of both specialists (zeros for a missing stain) serve the out-of-distribution score.
        embedding = features.flatten(1)
        return {
            "logits": mean,
            "scenario": scenario_ids(available),
            "expert_logits": expert_logits,
            "embedding": embedding,
        }
