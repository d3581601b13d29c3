"""Stain normalisation of H&E and HER2-IHC patches (MONAI transforms); see :mod:`.reference` for now."""

from __future__ import annotations

from her2_monai.transforms.stain_normalization.reference import (
    METHODS,
    REFERENCE_FORMAT,
    REFERENCE_VERSION,
    STAINS,
    DegenerateImageError,
    NormalizeStain,
    NormalizeStaind,
    StainNormalizationWarning,
    StainReference,
    channel_histograms,
    degenerate_reason,
    macenko_stain_matrix,
    reinhard_statistics,
)

__all__ = [
    "METHODS",
    "STAINS",
    "REFERENCE_FORMAT",
    "REFERENCE_VERSION",
    "StainNormalizationWarning",
    "DegenerateImageError",
    "StainReference",
    "NormalizeStain",
    "NormalizeStaind",
    "macenko_stain_matrix",
    "reinhard_statistics",
    "channel_histograms",
    "degenerate_reason",
]
