"""Stain normalisation of H&E and HER2-IHC patches as MONAI transforms: Macenko, Reinhard, histogram matching and
multi-target Macenko, all mapping an image onto a fitted, saveable :class:`StainReference`.

* :mod:`.statistics` -- the colour statistics of one image (Macenko stain vectors and concentrations, LAB moments,
  channel histograms) and when an image has none;
* :mod:`.reference` -- :class:`StainReference`: fitting the target statistics on reference images, and their JSON file;
* :mod:`.normalizers` -- mapping an image's statistics onto a reference's, one normaliser per method;
* :mod:`.transforms` -- :class:`NormalizeStain` and :class:`NormalizeStaind`.

Every public name is importable from this package, as it was from the single module it replaces.
"""

from __future__ import annotations

from her2_monai.transforms.stain_normalization.reference import (
    METHODS,
    REFERENCE_FORMAT,
    REFERENCE_VERSION,
    StainReference,
)
from her2_monai.transforms.stain_normalization.statistics import (
    STAINS,
    DegenerateImageError,
    channel_histograms,
    degenerate_reason,
    macenko_stain_matrix,
    reinhard_statistics,
)
from her2_monai.transforms.stain_normalization.transforms import (
    NormalizeStain,
    NormalizeStaind,
    StainNormalizationWarning,
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
