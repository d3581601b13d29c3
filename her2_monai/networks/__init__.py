"""Networks: CM-GAN (Pyramid-Pix2Pix), disentangled encoders, attention fusion, branch selector and alternatives."""

from __future__ import annotations

from her2_monai.networks.attention import ModalitySensitiveAttention
from her2_monai.networks.cmgan import CrossModalGAN
from her2_monai.networks.encoders import DisentangledEncoder, EfficientNetTrunk, ResNetTrunk, build_encoder
from her2_monai.networks.her2net import HER2DeployNet, HER2FlexibleNet
from her2_monai.networks.mora import MoRANet
from her2_monai.networks.pix2pix import PatchGANDiscriminator, PyramidPix2PixGenerator
from her2_monai.networks.selector import BranchSelector, train_selector
from her2_monai.networks.simmlm import SimMLMNet

__all__ = [
    "BranchSelector",
    "CrossModalGAN",
    "DisentangledEncoder",
    "EfficientNetTrunk",
    "HER2DeployNet",
    "HER2FlexibleNet",
    "ModalitySensitiveAttention",
    "MoRANet",
    "PatchGANDiscriminator",
    "PyramidPix2PixGenerator",
    "ResNetTrunk",
    "SimMLMNet",
    "build_encoder",
    "train_selector",
]
