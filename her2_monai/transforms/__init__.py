"""MONAI dictionary transforms for records with an H&E and/or an IHC stain."""

from __future__ import annotations

from her2_monai.transforms.io import UNLABELLED, LoadStainsd
from her2_monai.transforms.pipelines import stain_transforms
from her2_monai.transforms.stains import FillMissingStainsd, RandModalityDropoutd, RandStainJitterd

__all__ = [
    "UNLABELLED",
    "LoadStainsd",
    "FillMissingStainsd",
    "RandModalityDropoutd",
    "RandStainJitterd",
    "stain_transforms",
]
