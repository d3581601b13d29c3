"""Losses: pyramid L1 and GAN objectives of the CM-GAN, ShaSpec's DAO/DCO, SimMLM's MoFe."""

from __future__ import annotations

from her2_monai.losses.adversarial import GANLoss
from her2_monai.losses.disentangle import DisentanglementLoss, DomainAlignmentLoss, DomainClassificationLoss
from her2_monai.losses.mofe import MoFeLoss
from her2_monai.losses.pyramid import GaussianPyramid, PyramidL1Loss

__all__ = [
    "DisentanglementLoss",
    "DomainAlignmentLoss",
    "DomainClassificationLoss",
    "GANLoss",
    "GaussianPyramid",
    "MoFeLoss",
    "PyramidL1Loss",
]
