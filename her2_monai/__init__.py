"""her2-monai: HER2 scoring from H&E, IHC or both, robust to a missing stain."""

from __future__ import annotations

__version__ = "0.2.0"
