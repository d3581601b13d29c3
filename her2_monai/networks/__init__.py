"""Networks: CM-GAN (Pyramid-Pix2Pix), disentangled encoders, attention fusion, branch selector, HER2 classifier.

The alternative missing-modality models used for comparisons live in :mod:`her2_monai.networks.alternatives`.
"""

from __future__ import annotations

from her2_monai.networks.attention import ModalitySensitiveAttention
from her2_monai.networks.cmgan import CrossModalDiscriminators, CrossModalGAN
from her2_monai.networks.encoders import DisentangledEncoder, EfficientNetTrunk, ResNetTrunk, build_encoder
from her2_monai.networks.her2net import HER2FlexibleNet
from her2_monai.networks.pix2pix import PatchGANDiscriminator, PyramidPix2PixGenerator
from her2_monai.networks.record import ArchitectureMismatchError, RecordedNetwork
from her2_monai.networks.selector import BranchSelector

__all__ = [
    "ArchitectureMismatchError",
    "BranchSelector",
    "CrossModalDiscriminators",
    "CrossModalGAN",
    "DisentangledEncoder",
    "EfficientNetTrunk",
    "HER2FlexibleNet",
    "ModalitySensitiveAttention",
    "PatchGANDiscriminator",
    "PyramidPix2PixGenerator",
    "RecordedNetwork",
    "ResNetTrunk",
    "build_encoder",
]
