"""Other missing-modality classifiers, for comparison with the CM-GAN framework in the same harness.

Not part of the bundle's default model (select one with the training config's ``model`` knob):
``SimMLMNet`` (dynamic mixture of modality experts, trained with
:class:`~her2_monai.losses.classification.SimMLMLoss`), ``MoRANet`` (modality-aware low-rank adaptation, trained with
:class:`~her2_monai.losses.classification.ClassificationLoss`) and ``StainSpecialists`` (one network per stain,
trained with :class:`~her2_monai.losses.classification.SpecialistLoss`).
"""

from __future__ import annotations

from her2_monai.networks.alternatives.mora import MoRANet, ScenarioLowRankAdapter
from her2_monai.networks.alternatives.simmlm import ModalityExpert, SimMLMNet, masked_softmax, mixture_logits
from her2_monai.networks.alternatives.specialists import StainSpecialists

__all__ = [
    "MoRANet",
    "ScenarioLowRankAdapter",
    "ModalityExpert",
    "SimMLMNet",
    "StainSpecialists",
    "masked_softmax",
    "mixture_logits",
]
