"""MONAI dictionary transforms for records with an H&E and/or an IHC stain (the bundle configs chain them)."""

from __future__ import annotations

from her2_monai.transforms.augment import LabAppearanceBatch, RandLabAppearanced, RandStainJitterd
from her2_monai.transforms.ink import MAX_INK_FRACTION, InkMeasure, measure_ink
from her2_monai.transforms.load import LoadStainsd
from her2_monai.transforms.marker import DabPattern, dab_pattern
from her2_monai.transforms.missing import FillMissingStainsd, RandModalityDropoutd
from her2_monai.transforms.stain_normalization import NormalizeStain, NormalizeStaind, StainReference
from her2_monai.transforms.stain_settings import normalization_record, stain_references
from her2_monai.transforms.tissue import (
    INPUT_REFUSALS,
    MIN_TISSUE_FRACTION,
    InputCheck,
    TissueCheckd,
    tissue_fraction,
    tissue_mask,
)
from her2_monai.transforms.tissue_layout import RandGlassAndFatd

__all__ = [
    "LoadStainsd",
    "FillMissingStainsd",
    "RandModalityDropoutd",
    "RandStainJitterd",
    "RandLabAppearanced",
    "LabAppearanceBatch",
    "TissueCheckd",
    "InputCheck",
    "INPUT_REFUSALS",
    "MIN_TISSUE_FRACTION",
    "tissue_fraction",
    "tissue_mask",
    "MAX_INK_FRACTION",
    "InkMeasure",
    "measure_ink",
    "DabPattern",
    "dab_pattern",
    "NormalizeStain",
    "NormalizeStaind",
    "StainReference",
    "stain_references",
    "normalization_record",
    "RandGlassAndFatd",
]
