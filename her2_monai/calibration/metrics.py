"""Calibration metrics of a classifier: expected calibration error (top label and class-wise) and reliability bins.

The binning and the ECE are MONAI's (:func:`monai.metrics.calibration_binning` and
:class:`monai.metrics.CalibrationErrorMetric`: equal-width bins over ``[0, 1]``, left-closed); a classification output
``(N, C)`` is laid out as their ``(batch=1, channel, spatial=N)`` input.

* **ECE** (Guo et al., ICML 2017): bin the top-label confidence; the weighted mean over bins of
  ``|accuracy - mean confidence|``, the weights being the share of samples in each bin.
* **Class-wise ECE** of class ``k`` (Kull et al., NeurIPS 2019): bin the probability ``p_k`` of *every* sample and
  compare it with the frequency of class ``k`` in each bin, i.e. the ECE of the one-vs-rest question "is it ``k``?".
  This is what "calibration of the 1+ class" measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import CalibrationErrorMetric, calibration_binning

from her2_monai.constants import CLASS_NAMES

__all__ = [
    "NUM_BINS",
    "reliability_bins",
    "expected_calibration_error",
    "classwise_ece",
    "negative_log_likelihood",
    "calibration_summary",
]

#: Bins of every ECE in the project (the literature's 15).
NUM_BINS = 15


def _check(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"expected (N, C) probabilities and (N,) labels, got {probabilities.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise ValueError(f"labels must lie in [0, {probabilities.shape[1] - 1}]")
    return probabilities, labels


def reliability_bins(
    confidence: Any, outcome: Any, num_bins: int = NUM_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin mean confidence, mean outcome and count (MONAI's binning).

    Args:
        confidence: ``(N,)`` probabilities in ``[0, 1]``.
        outcome: ``(N,)`` 0/1 outcomes (prediction correct, or sample of the class).
        num_bins: equal-width bins over ``[0, 1]``.

    Returns:
        ``(mean_confidence, mean_outcome, count)``, each ``(num_bins,)``; empty bins hold NaN means.
    """
    p = torch.as_tensor(np.asarray(confidence, dtype=np.float32).reshape(1, 1, -1))
    y = torch.as_tensor(np.asarray(outcome, dtype=np.float32).reshape(1, 1, -1))
    mean_p, mean_y, count = calibration_binning(p, y, num_bins=num_bins)
    return mean_p[0, 0].numpy(), mean_y[0, 0].numpy(), count[0, 0].numpy()


def _ece(confidence: np.ndarray, outcome: np.ndarray, num_bins: int) -> float:
    if confidence.size == 0:
        return float("nan")
    metric = CalibrationErrorMetric(num_bins=num_bins, include_background=True, calibration_reduction="expected")
    p = torch.as_tensor(np.asarray(confidence, dtype=np.float32).reshape(1, 1, -1))
    y = torch.as_tensor(np.asarray(outcome, dtype=np.float32).reshape(1, 1, -1))
    return float(metric(p, y).reshape(-1)[0])


def expected_calibration_error(probabilities: Any, labels: Any, num_bins: int = NUM_BINS) -> float:
    """Top-label expected calibration error.

    Args:
        probabilities: ``(N, C)`` class probabilities.
        labels: ``(N,)`` true classes.
        num_bins: equal-width confidence bins.

    Returns:
        The ECE in ``[0, 1]`` (NaN without samples).
    """
    probabilities, labels = _check(probabilities, labels)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    return _ece(confidence, correct, num_bins)


def classwise_ece(probabilities: Any, labels: Any, num_bins: int = NUM_BINS) -> np.ndarray:
    """Class-wise ECE: for each class ``k``, the ECE of ``p_k`` against the indicator ``label == k``.

    Args:
        probabilities: ``(N, C)``.
        labels: ``(N,)``.
        num_bins: equal-width probability bins.

    Returns:
        ``(C,)`` errors (NaN without samples).
    """
    probabilities, labels = _check(probabilities, labels)
    return np.array(
        [_ece(probabilities[:, k], (labels == k).astype(np.float64), num_bins) for k in range(probabilities.shape[1])]
    )


def negative_log_likelihood(probabilities: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true classes.

    Args:
        probabilities: ``(N, C)``.
        labels: ``(N,)``.
        eps: floor of a probability before the log.

    Returns:
        The mean NLL (NaN without samples).
    """
    probabilities, labels = _check(probabilities, labels)
    if labels.size == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(labels.size), labels], eps, None))))


def calibration_summary(
    probabilities: Any, labels: Any, class_names: Sequence[str] = CLASS_NAMES, num_bins: int = NUM_BINS
) -> dict[str, Any]:
    """ECE, class-wise ECE per class name, NLL and the reliability bins of one set of predictions.

    Args:
        probabilities: ``(N, C)``.
        labels: ``(N,)``.
        class_names: the ``C`` class names.
        num_bins: bins.

    Returns:
        ``{"ece", "ece_per_class": {name: value}, "nll", "bins": {"confidence", "accuracy", "count"}}``.
    """
    probabilities, labels = _check(probabilities, labels)
    per_class = classwise_ece(probabilities, labels, num_bins)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64) if labels.size else np.zeros(0)
    mean_p, mean_y, count = reliability_bins(
        probabilities.max(axis=1) if labels.size else np.zeros(0), correct, num_bins
    )
    return {
        "ece": expected_calibration_error(probabilities, labels, num_bins),
        "ece_per_class": {name: float(v) for name, v in zip(class_names, per_class)},
        "nll": negative_log_likelihood(probabilities, labels),
        "bins": {"confidence": mean_p.tolist(), "accuracy": mean_y.tolist(), "count": count.astype(int).tolist()},
    }
