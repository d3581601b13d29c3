"""Other missing-modality classifiers, for comparison with the CM-GAN framework in the same harness.

Not part of the bundle's default model: ``SimMLMNet`` (dynamic mixture of modality experts, trained with
:class:`~her2_monai.losses.classification.SimMLMLoss`) and ``MoRANet`` (modality-aware low-rank adaptation, trained
with :class:`~her2_monai.losses.classification.ClassificationLoss`).
"""

from __future__ import annotations

from her2_monai.networks.alternatives.mora import MoRANet, ScenarioLowRankAdapter
from her2_monai.networks.alternatives.simmlm import ModalityExpert, SimMLMNet, masked_softmax, mixture_logits

__all__ = ["MoRANet", "ScenarioLowRankAdapter", "ModalityExpert", "SimMLMNet", "masked_softmax", "mixture_logits"]
