"""Explanations: class activation maps over each stain, stain-attention weights, and the figures that show them."""

from __future__ import annotations

from her2_monai.explain.attention import attention_summary, real_vs_synthetic
from her2_monai.explain.cam import CAM_METHODS, ScoreCAM, StainCAM, StainLogits, normalize_maps
from her2_monai.explain.figures import overlay, save_cam_gallery, save_explanation, to_rgb

__all__ = [
    "CAM_METHODS",
    "ScoreCAM",
    "StainCAM",
    "StainLogits",
    "normalize_maps",
    "attention_summary",
    "real_vs_synthetic",
    "overlay",
    "save_cam_gallery",
    "save_explanation",
    "to_rgb",
]
