"""The referral rule: predictions whose confidence is below a threshold go to a pathologist.

The threshold is chosen on validation so that the accuracy of the cases the model keeps (``confidence >= t``) reaches
a target; the lowest such threshold keeps the most cases. :func:`coverage_accuracy_curve` gives the whole trade-off
for the report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["REFER_ALL", "coverage_accuracy_curve", "choose_refer_threshold", "referral_outcome"]

#: Threshold that refers every case (above any probability): used when no threshold reaches the target.
REFER_ALL = math.nextafter(1.0, 2.0)


def _check(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence and correct must have the same length, got {confidence.size} and {correct.size}")
    return confidence, correct


def coverage_accuracy_curve(confidence: Any, correct: Any) -> dict[str, list[float]]:
    """Coverage and accuracy of the kept cases for every threshold that changes which cases are kept.

    Args:
        confidence: ``(N,)`` confidence of each prediction.
        correct: ``(N,)`` whether it was right.

    Returns:
        ``{"threshold", "coverage", "accuracy"}``: lists in decreasing threshold order (coverage rising); the case
        kept at threshold ``t`` are those with ``confidence >= t``.
    """
    confidence, correct = _check(confidence, correct)
    if confidence.size == 0:
        return {"threshold": [], "coverage": [], "accuracy": []}
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(np.float64)
    kept = np.arange(1, conf.size + 1)
    accuracy = np.cumsum(hits) / kept
    # Only the last index of each run of equal confidences is a reachable operating point.
    last = np.r_[conf[1:] != conf[:-1], True]
    return {
        "threshold": conf[last].tolist(),
        "coverage": (kept[last] / conf.size).tolist(),
        "accuracy": accuracy[last].tolist(),
    }


def choose_refer_threshold(confidence: Any, correct: Any, target_accuracy: float = 0.95) -> dict[str, Any]:
    """The lowest confidence threshold at which the kept cases are at least ``target_accuracy`` correct.

    Args:
        confidence: ``(N,)`` validation confidences.
        correct: ``(N,)`` whether each validation prediction was right.
        target_accuracy: required accuracy of the non-referred cases, in ``(0, 1]``.

    Returns:
        ``{"threshold", "target_accuracy", "target_met", "coverage", "accuracy", "n"}``: ``threshold`` is
        :data:`REFER_ALL` (every case referred, coverage 0) when no threshold reaches the target.

    Raises:
        ValueError: for a target outside ``(0, 1]``.
    """
    if not 0.0 < float(target_accuracy) <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    curve = coverage_accuracy_curve(confidence, correct)
    ok = [i for i, acc in enumerate(curve["accuracy"]) if acc >= target_accuracy - 1e-12]
    base = {"target_accuracy": float(target_accuracy), "n": len(np.asarray(confidence).reshape(-1))}
    if not ok:
        return {**base, "threshold": REFER_ALL, "target_met": False, "coverage": 0.0, "accuracy": None}
    i = ok[-1]
    return {
        **base,
        "threshold": float(curve["threshold"][i]),
        "target_met": True,
        "coverage": float(curve["coverage"][i]),
        "accuracy": float(curve["accuracy"][i]),
    }


def referral_outcome(confidence: Any, correct: Any, threshold: float) -> dict[str, Any]:
    """What a fixed threshold does on a set of predictions (e.g. the test split).

    Args:
        confidence: ``(N,)``.
        correct: ``(N,)``.
        threshold: keep cases with ``confidence >= threshold``.

    Returns:
        ``{"threshold", "coverage", "referral_rate", "accuracy_kept", "accuracy_referred", "n_kept", "n"}``
        (accuracies NaN for an empty group).
    """
    confidence, correct = _check(confidence, correct)
    kept = confidence >= threshold
    n = confidence.size

    def acc(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    return {
        "threshold": float(threshold),
        "coverage": float(kept.mean()) if n else float("nan"),
        "referral_rate": float(1.0 - kept.mean()) if n else float("nan"),
        "accuracy_kept": acc(kept),
        "accuracy_referred": acc(~kept),
        "n_kept": int(kept.sum()),
        "n": int(n),
    }
