"""Metrics: per-scenario classification, stain-translation quality, and the evaluation report."""

from __future__ import annotations

from her2_monai.metrics.classification import ScenarioClassificationMetric, classification_report, macro_f1
from her2_monai.metrics.metrics_json import translation_summary, write_evaluation_report
from her2_monai.metrics.translation import CONVENTION, TranslationMetric, psnr_ssim, to_uint8_images

__all__ = [
    "ScenarioClassificationMetric",
    "classification_report",
    "macro_f1",
    "TranslationMetric",
    "psnr_ssim",
    "to_uint8_images",
    "CONVENTION",
    "translation_summary",
    "write_evaluation_report",
]
