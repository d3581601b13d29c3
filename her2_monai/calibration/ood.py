"""Out-of-distribution scores: how unlike the training data an input is (higher = more unlike).

Three candidates, each fitted at the end of training and stored as plain data with the model:

* ``msp``: minus the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017) -- the baseline, no statistics;
* ``energy``: minus ``logsumexp`` of the logits (Liu et al., NeurIPS 2020) -- no statistics;
* ``mahalanobis``: the smallest Mahalanobis distance of the pooled embedding to the per-class training means under
  one shared covariance (Lee et al., NeurIPS 2018). The embedding (``4 x attention_channels`` wide) is first
  projected on its leading principal components (``components``, default 64) -- the covariance of a few hundred
  training cases in 1,024 dimensions is singular, and the projection keeps the stored statistics small -- and the
  within-class covariance is estimated with Ledoit-Wolf shrinkage (scikit-learn).

Which one the bundle uses (``ood_method``) was decided by measurement: ``benchmarks/eval_trust.py`` and
``docs/design.md``. :func:`ood_threshold` turns the in-distribution validation scores into the refusal threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf

__all__ = [
    "OOD_METHODS",
    "OODScore",
    "MaxSoftmaxScore",
    "EnergyScore",
    "MahalanobisScore",
    "ood_threshold",
    "build_ood",
]


class OODScore:
    """Base class: ``fit`` on training outputs, ``score`` new ones, ``state``/``from_state`` as plain data."""

    name = ""

    def fit(self, logits: Any, embedding: Any, labels: Any) -> OODScore:
        """Fit on in-distribution training outputs (default: nothing to fit).

        Args:
            logits: ``(N, C)``.
            embedding: ``(N, D)``.
            labels: ``(N,)``.

        Returns:
            ``self``.
        """
        return self

    def score(self, logits: Any, embedding: Any) -> np.ndarray:
        """``(N,)`` scores, higher = more unlike the training data."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Plain-data state (JSON-like), stored in the model record."""
        return {"method": self.name}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OODScore:
        """Rebuild from :meth:`state`."""
        return cls()


class MaxSoftmaxScore(OODScore):
    """``-max softmax(logits)``."""

    name = "msp"

    def score(self, logits: Any, embedding: Any = None) -> np.ndarray:
        return -softmax(np.asarray(logits, dtype=np.float64), axis=1).max(axis=1)


class EnergyScore(OODScore):
    """``-logsumexp(logits)`` (the free energy at temperature 1)."""

    name = "energy"

    def score(self, logits: Any, embedding: Any = None) -> np.ndarray:
        return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


class MahalanobisScore(OODScore):
    """Minimum class-conditional Mahalanobis distance with a shared (shrunk) covariance in a PCA subspace.

    Args:
        components: principal components kept (at most ``N - C`` and ``D``); ``None`` keeps every dimension.

    Raises:
        ValueError: for fewer than 2 components.
    """

    name = "mahalanobis"

    def __init__(self, components: int | None = 64) -> None:
        if components is not None and components < 2:
            raise ValueError(f"components must be >= 2 (or None), got {components}")
        self.components = components
        self.mean: np.ndarray | None = None
        self.projection: np.ndarray | None = None
        self.class_means: np.ndarray | None = None
        self.precision: np.ndarray | None = None

    def fit(self, logits: Any, embedding: Any, labels: Any) -> MahalanobisScore:
        """Fit the statistics.

        Raises:
            ValueError: with fewer than 2 classes present or fewer samples than classes + 2.
        """
        x = np.asarray(embedding, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        classes = np.unique(y)
        if x.ndim != 2 or x.shape[0] != y.size:
            raise ValueError(f"expected (N, D) embeddings and (N,) labels, got {x.shape} and {y.shape}")
        if classes.size < 2 or y.size < classes.size + 2:
            raise ValueError(f"Mahalanobis statistics need >= 2 classes and more samples; got {y.size} samples")
        self.mean = x.mean(axis=0)
        centred = x - self.mean
        k = min(self.components or x.shape[1], x.shape[1], y.size - classes.size)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        self.projection = vt[:k].T
        z = centred @ self.projection
        n_classes = int(max(classes.max() + 1, 1))
        self.class_means = np.full((n_classes, k), np.nan)
        residuals = np.empty_like(z)
        for c in classes:
            rows = y == c
            self.class_means[c] = z[rows].mean(axis=0)
            residuals[rows] = z[rows] - self.class_means[c]
        covariance = LedoitWolf(assume_centered=True).fit(residuals).covariance_
        self.precision = np.linalg.inv(covariance)
        return self

    def score(self, logits: Any, embedding: Any) -> np.ndarray:
        if self.precision is None:
            raise RuntimeError("MahalanobisScore is not fitted")
        z = (np.asarray(embedding, dtype=np.float64) - self.mean) @ self.projection
        means = self.class_means[~np.isnan(self.class_means).any(axis=1)]
        diff = z[:, None, :] - means[None]  # (N, C, k)
        distances = np.einsum("nck,kl,ncl->nc", diff, self.precision, diff)
        return np.sqrt(np.clip(distances.min(axis=1), 0.0, None))

    def state(self) -> dict[str, Any]:
        if self.precision is None:
            raise RuntimeError("MahalanobisScore is not fitted")
        as_list = lambda a: np.asarray(a, dtype=np.float32).tolist()  # noqa: E731
        return {
            "method": self.name,
            "components": int(self.projection.shape[1]),
            "mean": as_list(self.mean),
            "projection": as_list(self.projection),
            "class_means": as_list(self.class_means),
            "precision": as_list(self.precision),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MahalanobisScore:
        scorer = cls(int(state["components"]))
        scorer.mean = np.asarray(state["mean"], dtype=np.float64)
        scorer.projection = np.asarray(state["projection"], dtype=np.float64)
        scorer.class_means = np.asarray(
            [[np.nan if v is None else v for v in row] for row in state["class_means"]], dtype=np.float64
        )
        scorer.precision = np.asarray(state["precision"], dtype=np.float64)
        return scorer


OOD_METHODS: dict[str, type[OODScore]] = {
    MaxSoftmaxScore.name: MaxSoftmaxScore,
    EnergyScore.name: EnergyScore,
    MahalanobisScore.name: MahalanobisScore,
}


def build_ood(method: str, **kwargs: Any) -> OODScore:
    """A new, unfitted score of the named method.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in OOD_METHODS:
        raise ValueError(f"unknown OOD method '{method}'; expected one of {sorted(OOD_METHODS)}")
    return OOD_METHODS[method](**kwargs)


def ood_threshold(scores: Any, pass_rate: float = 0.95) -> float:
    """The smallest observed score such that at least ``pass_rate`` of ``scores`` are at or below it.

    Args:
        scores: ``(N,)`` in-distribution (validation) scores.
        pass_rate: share of in-distribution cases that must pass, in ``(0, 1]``.

    Returns:
        The threshold (an input passes when its score is ``<=`` it); ``inf`` without scores.

    Raises:
        ValueError: for a pass rate outside ``(0, 1]``.
    """
    if not 0.0 < float(pass_rate) <= 1.0:
        raise ValueError(f"pass_rate must be in (0, 1], got {pass_rate}")
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if scores.size == 0:
        return float("inf")
    index = int(np.ceil(pass_rate * scores.size)) - 1
    return float(scores[max(index, 0)])
