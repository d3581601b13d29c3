"""The evaluation metrics file ``eval/metrics.json``: per-scenario classification and stain-translation quality.

The HTML report built from it is :mod:`her2_monai.report`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from her2_monai.fileio import write_json_atomic
from her2_monai.metrics.translation import CONVENTION

__all__ = ["translation_summary", "write_evaluation_report"]

logger = logging.getLogger(__name__)

_TRANSLATION_METRICS = {
    "he_to_ihc": ("psnr_he_to_ihc", "ssim_he_to_ihc"),
    "ihc_to_he": ("psnr_ihc_to_he", "ssim_ihc_to_he"),
}


def translation_summary(metrics: Mapping[str, float], n_pairs: int, resolution: int) -> dict[str, Any]:
    """Translation section of the report from a :class:`TranslationEvaluator`'s ``state.metrics``.

    Args:
        metrics: holds ``psnr_he_to_ihc``, ``ssim_he_to_ihc``, ``psnr_ihc_to_he``, ``ssim_ihc_to_he``.
        n_pairs: number of test pairs with both stains.
        resolution: side in pixels of the images compared.

    Returns:
        ``{"convention", "resolution", "n_pairs", "he_to_ihc": {"psnr", "ssim"}, "ihc_to_he": {...}}``, or an
        ``available: false`` section with the reason when nothing was evaluated.
    """
    base = {"convention": CONVENTION, "resolution": [int(resolution), int(resolution)], "n_pairs": int(n_pairs)}
    if not metrics or n_pairs == 0:
        return {**base, "available": False, "reason": "no test pairs with both stains, or no CM-GAN in the model"}
    out: dict[str, Any] = {**base, "available": True}
    for direction, (psnr, ssim) in _TRANSLATION_METRICS.items():
        out[direction] = {"psnr": float(metrics[psnr]), "ssim": float(metrics[ssim])}
    return out


def write_evaluation_report(
    path: str | os.PathLike,
    scenarios: Mapping[str, Mapping[str, Any]],
    checkpoint: str | os.PathLike,
    n_test: int,
    translation_metrics: Mapping[str, float] | None = None,
    n_pairs: int = 0,
    image_size: int | None = None,
    translation_size: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble ``eval/metrics.json`` and write it atomically.

    Layout (extensible: later analyses add keys next to these): ``{"scenarios": {"dual": {...}, "he_only": {...},
    "ihc_only": {...}}, "translation": {...}, "checkpoint": ..., "n_test": ..., "image_size": ..., **extra}``.

    Args:
        path: report file.
        scenarios: ``{scenario: classification report}``, e.g. from
            :meth:`~her2_monai.handlers.probabilities.ScenarioProbabilityCollector.reports`.
        checkpoint: the evaluated weights.
        n_test: labelled test records.
        translation_metrics: ``state.metrics`` of the translation evaluator (``None``/empty: not evaluated).
        n_pairs: test pairs with both stains.
        image_size: classifier input side.
        translation_size: side of the translated images (default ``image_size``).
        extra: more top-level entries (e.g. ``datalist``).

    Returns:
        The report.
    """
    report: dict[str, Any] = {
        "scenarios": dict(scenarios),
        "translation": translation_summary(translation_metrics or {}, n_pairs, translation_size or image_size or 0),
        "checkpoint": str(checkpoint),
        "n_test": int(n_test),
        "image_size": image_size,
        **extra,
    }
    write_json_atomic(report, path)
    for scenario, r in report["scenarios"].items():
        if r.get("n"):
            logger.info("test %-8s n=%d accuracy %.4f macro-F1 %.4f", scenario, r["n"], r["accuracy"], r["macro_f1"])
    logger.info("evaluation report written to %s", path)
    return report
