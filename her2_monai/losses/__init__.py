"""Losses: the classifiers' training objectives (HER2Loss...), pyramid L1 and GAN losses of the CM-GAN, and their
building blocks (ShaSpec's DAO/DCO, SimMLM's MoFe)."""

from __future__ import annotations

from her2_monai.losses.adversarial import GANLoss
from her2_monai.losses.classification import (
    AUXILIARY_SAMPLES,
    ClassificationLoss,
    HER2Loss,
    SimMLMLoss,
    SpecialistLoss,
)
from her2_monai.losses.disentangle import DisentanglementLoss, DomainAlignmentLoss, DomainClassificationLoss
from her2_monai.losses.mofe import MoFeLoss
from her2_monai.losses.pyramid import GaussianPyramid, PyramidL1Loss

__all__ = [
    "AUXILIARY_SAMPLES",
    "ClassificationLoss",
    "HER2Loss",
    "SimMLMLoss",
    "SpecialistLoss",
    "DisentanglementLoss",
    "DomainAlignmentLoss",
    "DomainClassificationLoss",
    "GANLoss",
    "GaussianPyramid",
    "MoFeLoss",
    "PyramidL1Loss",
]
