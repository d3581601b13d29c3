"""Temperature scaling (Guo et al., ICML 2017): one scalar ``T`` divides the logits, fitted by minimising the NLL.

Dividing every logit by the same ``T > 0`` keeps the predicted class (the argmax) and the accuracy; ``T > 1`` softens
an over-confident model, ``T < 1`` sharpens an under-confident one. The NLL is convex in ``1 / T``, so a bounded
scalar search over ``log T`` (SciPy) finds the optimum reliably.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

__all__ = ["scaled_nll", "fit_temperature", "apply_temperature"]

#: Search range of ``T``.
T_MIN, T_MAX = 0.05, 20.0


def _check(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected (N, C) logits and (N,) labels, got {logits.shape} and {labels.shape}")
    return logits, labels


def scaled_nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)``.
        temperature: ``T > 0``.

    Returns:
        The NLL.
    """
    logits, labels = _check(logits, labels)
    log_p = log_softmax(logits / float(temperature), axis=1)
    return float(-log_p[np.arange(labels.size), labels].mean())


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature that minimises the NLL of ``labels`` under ``softmax(logits / T)``.

    Args:
        logits: ``(N, C)`` uncalibrated logits (validation set).
        labels: ``(N,)`` true classes.

    Returns:
        ``T`` in ``[0.05, 20]`` (1.0 without samples).

    Raises:
        ValueError: for mismatched shapes.
    """
    logits, labels = _check(logits, labels)
    if labels.size == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: scaled_nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(T_MIN), np.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``.

    Args:
        logits: ``(N, C)``.
        temperature: ``T > 0``.

    Returns:
        ``(N, C)`` probabilities.
    """
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(log_softmax(logits / float(temperature), axis=-1))
