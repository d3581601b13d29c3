"""Whole-slide HER2 scoring: slide reading, tissue tiles, batched inference, the slide call, its files, cohorts."""

from __future__ import annotations

from her2_monai.wsi.call import RULE, slide_call
from her2_monai.wsi.cohort import CohortError, CohortIncompleteError, list_slides, run_cohort
from her2_monai.wsi.inference import STAIN_MODES, TilePlan, TilingSettings, WholeSlideScorer, plan_tiles
from her2_monai.wsi.reader import BACKENDS, Slide, SlideOpenError, open_slide
from her2_monai.wsi.run import run_wsi, slide_summary
from her2_monai.wsi.tissue import Tile, tile_grid, tissue_mask

__all__ = [
    "BACKENDS",
    "CohortError",
    "CohortIncompleteError",
    "RULE",
    "STAIN_MODES",
    "Slide",
    "SlideOpenError",
    "Tile",
    "TilePlan",
    "TilingSettings",
    "WholeSlideScorer",
    "open_slide",
    "list_slides",
    "plan_tiles",
    "run_cohort",
    "run_wsi",
    "slide_call",
    "slide_summary",
    "tile_grid",
    "tissue_mask",
]
