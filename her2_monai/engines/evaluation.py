"""Test-set evaluation of the trained bundle: per-scenario probabilities, and the ``eval/metrics.json`` report."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from her2_monai.constants import SCENARIOS
from her2_monai.inference.network import TRAIN_COMMAND
from her2_monai.inference.writer import write_json_atomic
from her2_monai.metrics import CONVENTION, classification_report

__all__ = ["ScenarioProbabilityCollector", "require_checkpoint", "translation_summary", "write_evaluation_report"]

logger = logging.getLogger(__name__)

_TRANSLATION_METRICS = {
    "he_to_ihc": ("psnr_he_to_ihc", "ssim_he_to_ihc"),
    "ihc_to_he": ("psnr_ihc_to_he", "ssim_ihc_to_he"),
}


class ScenarioProbabilityCollector:
    """Ignite handler that keeps the class probabilities and labels of every sample, per scenario.

    Attach to a :class:`~her2_monai.engines.evaluators.ScenarioEvaluator` (``decollate=False``): its output per
    iteration is ``{"logits": {scenario: (N, 4)}, "label": {scenario: (N,)}}``. The arrays stay available after the
    run (:attr:`probabilities`, :attr:`labels`) for later analyses such as calibration.

    Args:
        scenarios: scenarios to collect, in report order.
    """

    def __init__(self, scenarios: Sequence[str] = SCENARIOS) -> None:
        self.scenarios = tuple(scenarios)
        self._probs: dict[str, list[np.ndarray]] = {}
        self._labels: dict[str, list[np.ndarray]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self._probs = {s: [] for s in self.scenarios}
        self._labels = {s: [] for s in self.scenarios}

    def attach(self, engine: Engine) -> None:
        """Reset when a run starts and collect after every iteration."""
        engine.add_event_handler(Events.STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, Mapping) or "logits" not in output or "label" not in output:
            raise TypeError(
                "ScenarioProbabilityCollector expects ScenarioEvaluator outputs {'logits': ..., 'label': ...}"
            )
        for scenario in self.scenarios:
            if scenario not in output["logits"]:
                continue
            logits = torch.as_tensor(output["logits"][scenario]).detach().float()
            self._probs[scenario].append(logits.softmax(dim=1).cpu().numpy())
            self._labels[scenario].append(torch.as_tensor(output["label"][scenario]).detach().cpu().numpy())

    @property
    def probabilities(self) -> dict[str, np.ndarray]:
        """``{scenario: (N, 4)}`` softmax probabilities (``(0, 4)`` when the scenario had no sample)."""
        return {s: np.concatenate(p) if p else np.zeros((0, 4)) for s, p in self._probs.items()}

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """``{scenario: (N,)}`` true classes."""
        return {s: np.concatenate(v).astype(int) if v else np.zeros((0,), int) for s, v in self._labels.items()}

    def reports(self) -> dict[str, dict[str, Any]]:
        """``{scenario: classification_report}`` (accuracy, macro-F1, per-class P/R/F1/AUC, confusion matrix,
        HER2-low AUC); a scenario without samples reports ``{"n": 0}``."""
        probs, labels = self.probabilities, self.labels
        return {s: classification_report(probs[s], labels[s]) if len(labels[s]) else {"n": 0} for s in self.scenarios}


def require_checkpoint(path: str | os.PathLike) -> str:
    """Fail with the command that creates ``path`` (the trained classifier) when it is missing.

    Returns:
        ``path`` as a string.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"trained HER2 classifier not found at '{path}'. Train the bundle first: {TRAIN_COMMAND}"
        )
    return str(path)


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
    collector: ScenarioProbabilityCollector,
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
        collector: the collector attached to the test-set scenario evaluator.
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
        "scenarios": collector.reports(),
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
