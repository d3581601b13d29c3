"""Out-of-distribution scores: how unlike the training data an input is (higher = more unlike).

Each score is fitted at the end of training and stored as plain data with the model. It reads named per-case arrays
(:data:`~her2_monai.calibration.ood_features.OODInputs`): the classifier's ``logits`` and pooled ``embedding``, and the
per-stain statistics of :mod:`~her2_monai.calibration.ood_features` (``image_he``, ``stages_ihc``, ...; NaN rows where
a case lacks the stain). ``requires`` names what a score reads, so callers compute only that.

Scores on the classifier's outputs:

* ``msp``: minus the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017) -- the baseline, no statistics;
* ``energy``: minus ``logsumexp`` of the logits (Liu et al., NeurIPS 2020) -- no statistics;
* ``mahalanobis``: the smallest Mahalanobis distance of the pooled embedding to the per-class training means under
  one shared covariance (Lee et al., NeurIPS 2018). The embedding (``4 x attention_channels`` wide) is first
  projected on its leading principal components (``components``, default 64) -- the covariance of a few hundred
  training cases in 1,024 dimensions is singular, and the projection keeps the stored statistics small -- and the
  within-class covariance is estimated with Ledoit-Wolf shrinkage (scikit-learn);
* ``knn``: the distance of the L2-normalised embedding to its k-th nearest training embedding (Sun et al., ICML 2022).

Scores on the images a case really has, per stain (a case's score is the largest of its stains'):

* ``image_stats``: Mahalanobis distance of the image's stain and texture statistics
  (:class:`~her2_monai.calibration.ood_features.ImageStatistics` on the model input) to the training images of that
  stain -- what the classifier's features may not see: colours, stain mix and texture the training data never had;
* ``stage_stats``: the same on the channel means and standard deviations of the shared encoder's four stages
  (feature statistics at several depths, in the spirit of Lee et al.'s feature ensemble), in a PCA subspace;
* ``cycle``: the CM-GAN's round-trip error (H&E -> IHC -> H&E, IHC -> H&E -> IHC) as a z-score against training.

And ``union``: several of the above, each standardised by its training scores, refusing when any member is far
(the largest standardised member score).

Which one the bundle uses (``ood_method``) was decided by measurement on the sealed protocol:
``benchmarks/trust_ood.py`` and ``docs/ood.md``. :func:`ood_threshold` turns the in-distribution validation scores
into the refusal threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf

from her2_monai.calibration.ood_features import (
    BASE_INPUTS,
    CYCLE_ERROR,
    IMAGE_STATS,
    STAGE_STATS,
    STAIN_SLOTS,
    slot_key,
)

__all__ = [
    "OOD_METHODS",
    "OODScore",
    "MaxSoftmaxScore",
    "EnergyScore",
    "MahalanobisScore",
    "KNNScore",
    "GaussianStatistics",
    "StainStatisticsScore",
    "ImageStatisticsScore",
    "StageStatisticsScore",
    "CycleErrorScore",
    "UnionScore",
    "ood_threshold",
    "ood_rank_capped",
    "build_ood",
    "ood_from_state",
]


def _as_list(array: Any) -> list:
    return np.asarray(array, dtype=np.float32).tolist()


class OODScore:
    """Base class: ``fit`` on training outputs, ``score`` new ones, ``state``/``from_state`` as plain data.

    Scores of the classifier's outputs implement :meth:`fit` and :meth:`score` on ``(logits, embedding)``; scores of
    other inputs override :meth:`fit_inputs` and :meth:`score_inputs`, which every caller uses, and name their inputs
    in :attr:`requires`.
    """

    name = ""
    #: The :data:`~her2_monai.calibration.ood_features.OODInputs` names the score reads.
    requires: tuple[str, ...] = BASE_INPUTS

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

    def fit_inputs(self, inputs: Mapping[str, Any], labels: Any) -> OODScore:
        """Fit on the named inputs of in-distribution training cases.

        Args:
            inputs: :data:`~her2_monai.calibration.ood_features.OODInputs` holding at least :attr:`requires`.
            labels: ``(N,)`` class labels.

        Returns:
            ``self``.
        """
        return self.fit(inputs.get("logits"), inputs.get("embedding"), labels)

    def score_inputs(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """``(N,)`` scores of the named inputs of new cases, higher = more unlike the training data."""
        return self.score(inputs.get("logits"), inputs.get("embedding"))

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
    requires = ("logits",)

    def score(self, logits: Any, embedding: Any = None) -> np.ndarray:
        return -softmax(np.asarray(logits, dtype=np.float64), axis=1).max(axis=1)


class EnergyScore(OODScore):
    """``-logsumexp(logits)`` (the free energy at temperature 1)."""

    name = "energy"
    requires = ("logits",)

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
    requires = ("embedding",)

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
        return {
            "method": self.name,
            "components": int(self.projection.shape[1]),
            "mean": _as_list(self.mean),
            "projection": _as_list(self.projection),
            "class_means": _as_list(self.class_means),
            "precision": _as_list(self.precision),
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


class KNNScore(OODScore):
    """Distance of the L2-normalised embedding to its ``k``-th nearest training embedding (Sun et al., ICML 2022).

    The normalised training embeddings are projected on their leading principal components (``components``) and at
    most ``bank_size`` of them (a seeded subsample) are stored, with the length of what the projection leaves out:
    the squared distance is the projected one plus both left-out squared lengths (their cross term, a product of two
    near-orthogonal residuals in many dimensions, is dropped). A query that is new *outside* the training subspace
    is thereby still far -- the projection alone would discard exactly the directions that make it new.

    Args:
        k: neighbour rank.
        components: principal components kept (``None``: all).
        bank_size: training embeddings stored.

    Raises:
        ValueError: for ``k < 1`` or ``bank_size < k``.
    """

    name = "knn"
    requires = ("embedding",)

    def __init__(self, k: int = 5, components: int | None = 64, bank_size: int = 1000) -> None:
        if int(k) < 1 or int(bank_size) < int(k):
            raise ValueError(f"k must be >= 1 and bank_size >= k, got k={k}, bank_size={bank_size}")
        self.k = int(k)
        self.components = components
        self.bank_size = int(bank_size)
        self.mean: np.ndarray | None = None
        self.projection: np.ndarray | None = None
        self.bank: np.ndarray | None = None
        self.bank_residual: np.ndarray | None = None

    @staticmethod
    def _normalise(embedding: Any) -> np.ndarray:
        x = np.asarray(embedding, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def fit(self, logits: Any, embedding: Any, labels: Any = None) -> KNNScore:
        """Store the (projected) normalised training embeddings.

        Raises:
            ValueError: with fewer than ``k`` training cases.
        """
        x = self._normalise(embedding)
        if x.shape[0] < self.k:
            raise ValueError(f"the k-NN score needs at least k={self.k} training cases, got {x.shape[0]}")
        self.mean = x.mean(axis=0)
        keep = min(self.components or x.shape[1], x.shape[1], x.shape[0])
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.projection = vt[:keep].T
        if x.shape[0] > self.bank_size:
            x = x[np.sort(np.random.default_rng(0).choice(x.shape[0], self.bank_size, replace=False))]
        self.bank, self.bank_residual = self._project(x)
        return self

    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected coordinates and squared residual lengths of normalised vectors."""
        centred = x - self.mean
        z = centred @ self.projection
        return z, np.clip((centred * centred).sum(axis=1) - (z * z).sum(axis=1), 0.0, None)

    def score(self, logits: Any, embedding: Any) -> np.ndarray:
        if self.bank is None:
            raise RuntimeError("KNNScore is not fitted")
        z, residual = self._project(self._normalise(embedding))
        squared = (z * z).sum(axis=1)[:, None] + (self.bank * self.bank).sum(axis=1)[None] - 2.0 * z @ self.bank.T
        squared = squared + residual[:, None] + self.bank_residual[None]
        return np.sqrt(np.clip(np.partition(squared, self.k - 1, axis=1)[:, self.k - 1], 0.0, None))

    def state(self) -> dict[str, Any]:
        if self.bank is None:
            raise RuntimeError("KNNScore is not fitted")
        return {
            "method": self.name,
            "k": self.k,
            "components": int(self.projection.shape[1]),
            "bank_size": self.bank_size,
            "mean": _as_list(self.mean),
            "projection": _as_list(self.projection),
            "bank": _as_list(self.bank),
            "bank_residual": _as_list(self.bank_residual),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> KNNScore:
        scorer = cls(int(state["k"]), int(state["components"]), int(state["bank_size"]))
        scorer.mean = np.asarray(state["mean"], dtype=np.float64)
        scorer.projection = np.asarray(state["projection"], dtype=np.float64)
        scorer.bank = np.asarray(state["bank"], dtype=np.float64)
        scorer.bank_residual = np.asarray(state["bank_residual"], dtype=np.float64)
        return scorer


class GaussianStatistics:
    """One Gaussian model of feature vectors: Mahalanobis distance after standardisation (and optional PCA).

    Each feature is standardised by its training mean and a standard deviation combined in quadrature with
    ``min_scale`` (a soft floor), so that a statistic that never varies in training (a hue no training image has)
    does not turn rounding noise into an infinite distance. The covariance is estimated with Ledoit-Wolf shrinkage,
    which stays invertible with few cases. With ``components``, the standardised vectors are first projected on
    their leading principal components. (Adding the left-out length over the left-out training variance, as
    probabilistic PCA would, did worse on the encoder-stage statistics of ``docs/ood.md``: the training residual of a
    few hundred images in 2,000 dimensions is mostly noise.)

    Args:
        components: principal components kept (``None``: every feature).
        min_scale: floor of each feature's standard deviation, in the feature's units.

    Raises:
        ValueError: for ``components < 1`` or a negative ``min_scale``.
    """

    def __init__(self, components: int | None = None, min_scale: float = 0.01) -> None:
        if components is not None and int(components) < 1:
            raise ValueError(f"components must be >= 1 (or None), got {components}")
        if float(min_scale) < 0:
            raise ValueError(f"min_scale must be >= 0, got {min_scale}")
        self.components = None if components is None else int(components)
        self.min_scale = float(min_scale)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.projection: np.ndarray | None = None
        self.centre: np.ndarray | None = None
        self.precision: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run."""
        return self.precision is not None

    def fit(self, x: Any) -> GaussianStatistics:
        """Fit on ``(N, D)`` feature vectors (``N >= 2``).

        Raises:
            ValueError: for fewer than 2 rows or non-finite values.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
            raise ValueError(f"expected (N >= 2, D) finite feature vectors, got shape {x.shape}")
        self.mean = x.mean(axis=0)
        self.scale = np.sqrt(x.var(axis=0) + self.min_scale**2)
        z = (x - self.mean) / self.scale  # centred: the mean is the training mean
        self.projection = None
        if self.components is not None and self.components < z.shape[1]:
            _, _, vt = np.linalg.svd(z, full_matrices=False)
            self.projection = vt[: min(self.components, vt.shape[0])].T
            z = z @ self.projection
        self.precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(z - z.mean(axis=0)).covariance_)
        self.centre = z.mean(axis=0)
        return self

    def distance(self, x: Any) -> np.ndarray:
        """``(N,)`` Mahalanobis distances of ``(N, D)`` vectors."""
        if not self.fitted:
            raise RuntimeError("GaussianStatistics is not fitted")
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        diff = (z @ self.projection if self.projection is not None else z) - self.centre
        return np.sqrt(np.clip(np.einsum("nk,kl,nl->n", diff, self.precision, diff), 0.0, None))

    def state(self) -> dict[str, Any]:
        """Plain data."""
        if not self.fitted:
            raise RuntimeError("GaussianStatistics is not fitted")
        return {
            "components": self.components,
            "min_scale": self.min_scale,
            "mean": _as_list(self.mean),
            "scale": _as_list(self.scale),
            "projection": None if self.projection is None else _as_list(self.projection),
            "centre": _as_list(self.centre),
            "precision": _as_list(self.precision),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GaussianStatistics:
        """Rebuild from :meth:`state`."""
        model = cls(state.get("components"), float(state.get("min_scale", 0.0)))
        model.mean = np.asarray(state["mean"], dtype=np.float64)
        model.scale = np.asarray(state["scale"], dtype=np.float64)
        model.projection = None if state.get("projection") is None else np.asarray(state["projection"], np.float64)
        model.centre = np.asarray(state["centre"], dtype=np.float64)
        model.precision = np.asarray(state["precision"], dtype=np.float64)
        return model


class StainStatisticsScore(OODScore):
    """Per-stain Mahalanobis distance of per-image statistics; a case scores the largest distance of its stains.

    One :class:`GaussianStatistics` per stain slot is fitted on the training cases that have that stain (the rows of
    ``<family>_<stain>`` without NaN). A stain the training data never had is not scored (it adds nothing), since
    nothing says what it should look like. Subclasses fix the ``family`` and the defaults.

    Args:
        components: principal components of each Gaussian (``None``: every feature).
        min_scale: floor of each feature's standard deviation (see :class:`GaussianStatistics`).
    """

    family = ""
    default_components: int | None = None

    def __init__(self, components: int | None = -1, min_scale: float = 0.01) -> None:
        self.components = self.default_components if components == -1 else components
        self.min_scale = float(min_scale)
        self.models: dict[str, GaussianStatistics] = {}

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(slot_key(self.family, slot) for slot in STAIN_SLOTS)

    def fit(self, logits: Any, embedding: Any, labels: Any) -> StainStatisticsScore:
        raise ValueError(f"the '{self.name}' score reads per-stain statistics: call fit_inputs")

    def fit_inputs(self, inputs: Mapping[str, Any], labels: Any = None) -> StainStatisticsScore:
        """Fit one Gaussian per stain on the training rows that have that stain.

        Raises:
            ValueError: if no stain has two training images.
        """
        self.models = {}
        for slot in STAIN_SLOTS:
            x = np.asarray(inputs[slot_key(self.family, slot)], dtype=np.float64)
            rows = x[np.isfinite(x).all(axis=1)]
            if rows.shape[0] >= 2:
                self.models[slot] = GaussianStatistics(self.components, self.min_scale).fit(rows)
        if not self.models:
            raise ValueError(f"the '{self.name}' score needs at least 2 training images of a stain")
        return self

    def score_inputs(self, inputs: Mapping[str, Any]) -> np.ndarray:
        if not self.models:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        result = None
        for slot in STAIN_SLOTS:
            x = np.asarray(inputs[slot_key(self.family, slot)], dtype=np.float64)
            distance = np.full(x.shape[0], -np.inf)
            present = np.isfinite(x).all(axis=1)
            if slot in self.models and present.any():
                width = self.models[slot].mean.shape[0]
                if x.shape[1] != width:  # statistics of another version of ood_features
                    raise ValueError(
                        f"the stored '{self.name}' statistics have {width} features per {slot} image, these inputs "
                        f"{x.shape[1]}; refit them: python -m monai.bundle run calibrating ..."
                    )
                distance[present] = self.models[slot].distance(x[present])
            result = distance if result is None else np.maximum(result, distance)
        # A case with no scored stain has no evidence either way: NaN, which no threshold refuses.
        return np.where(np.isfinite(result), result, np.nan)

    def score(self, logits: Any, embedding: Any) -> np.ndarray:
        raise ValueError(f"the '{self.name}' score reads per-stain statistics: call score_inputs")

    def state(self) -> dict[str, Any]:
        if not self.models:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        return {
            "method": self.name,
            "components": self.components,
            "min_scale": self.min_scale,
            "stains": {slot: model.state() for slot, model in self.models.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StainStatisticsScore:
        scorer = cls(state.get("components"), float(state.get("min_scale", 0.01)))
        scorer.models = {slot: GaussianStatistics.from_state(s) for slot, s in dict(state["stains"]).items()}
        return scorer


class ImageStatisticsScore(StainStatisticsScore):
    """Stain and texture statistics of the model input (:class:`~her2_monai.calibration.ood_features.ImageStatistics`),
    per stain; every feature kept."""

    name = "image_stats"
    family = IMAGE_STATS


class StageStatisticsScore(StainStatisticsScore):
    """Channel means and standard deviations of the shared encoder's four stages, per stain, in a 32-component PCA
    subspace (thousands of features, hundreds of training images)."""

    name = "stage_stats"
    family = STAGE_STATS
    default_components = 32


class CycleErrorScore(StainStatisticsScore):
    """The CM-GAN's round-trip error per stain, as a distance (a z-score) to the training images' errors."""

    name = "cycle"
    family = CYCLE_ERROR


class UnionScore(OODScore):
    """Several scores at once: each standardised by its training scores, the case scores the largest.

    Member ``i``'s score ``s_i`` becomes ``(s_i - median_i) / (q95_i - median_i)`` with the median and 95th percentile
    of its scores on the training cases, so every member speaks in the same units; the union's score is the largest.
    One threshold on it (set on validation like any score's) is one threshold per member, ``median_i + t *
    (q95_i - median_i)``: a case is refused when any member exceeds its own, and the union as a whole passes the
    requested share of validation cases.

    Args:
        members: method names of :data:`OOD_METHODS` (not ``union``), or unfitted scores.
        options: keyword arguments per member name.

    Raises:
        ValueError: for no members, an unknown or nested member.
    """

    name = "union"

    def __init__(
        self,
        members: Sequence[str | OODScore] = ("image_stats", "mahalanobis"),
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if not members:
            raise ValueError("a union needs at least one member")
        built = []
        for member in members:
            if isinstance(member, str) and member == self.name:
                raise ValueError("a union cannot hold a union")
            if isinstance(member, str):
                member = build_ood(member, **dict((options or {}).get(member, {})))
            built.append(member)
        self.members: list[OODScore] = built
        self.scales: list[tuple[float, float]] = []

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        names: list[str] = []
        for member in self.members:
            names.extend(n for n in member.requires if n not in names)
        return tuple(names)

    def fit_inputs(self, inputs: Mapping[str, Any], labels: Any) -> UnionScore:
        """Fit every member, then its standardisation on its own training scores."""
        self.scales = []
        for member in self.members:
            member.fit_inputs(inputs, labels)
            scores = member.score_inputs(inputs)
            scores = scores[np.isfinite(scores)]
            median = float(np.median(scores)) if scores.size else 0.0
            spread = float(np.quantile(scores, 0.95)) - median if scores.size else 1.0
            self.scales.append((median, spread if spread > 1e-12 else 1.0))
        return self

    def fit(self, logits: Any, embedding: Any, labels: Any) -> UnionScore:
        return self.fit_inputs({"logits": logits, "embedding": embedding}, labels)

    def member_scores(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """``(N, M)`` standardised member scores (NaN where a member has no evidence)."""
        if len(self.scales) != len(self.members):
            raise RuntimeError("UnionScore is not fitted")
        columns = [(m.score_inputs(inputs) - a) / b for m, (a, b) in zip(self.members, self.scales)]
        return np.stack(columns, axis=1)

    def score_inputs(self, inputs: Mapping[str, Any]) -> np.ndarray:
        standardised = self.member_scores(inputs)
        empty = np.isnan(standardised).all(axis=1)
        return np.where(empty, np.nan, np.nanmax(np.where(empty[:, None], 0.0, standardised), axis=1))

    def score(self, logits: Any, embedding: Any) -> np.ndarray:
        return self.score_inputs({"logits": logits, "embedding": embedding})

    def state(self) -> dict[str, Any]:
        if len(self.scales) != len(self.members):
            raise RuntimeError("UnionScore is not fitted")
        return {
            "method": self.name,
            "members": [m.state() for m in self.members],
            "scales": [list(s) for s in self.scales],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> UnionScore:
        members = [ood_from_state(s) for s in state["members"]]
        scorer = cls(members)
        scorer.scales = [(float(a), float(b)) for a, b in state["scales"]]
        return scorer


OOD_METHODS: dict[str, type[OODScore]] = {
    MaxSoftmaxScore.name: MaxSoftmaxScore,
    EnergyScore.name: EnergyScore,
    MahalanobisScore.name: MahalanobisScore,
    KNNScore.name: KNNScore,
    ImageStatisticsScore.name: ImageStatisticsScore,
    StageStatisticsScore.name: StageStatisticsScore,
    CycleErrorScore.name: CycleErrorScore,
    UnionScore.name: UnionScore,
}


def build_ood(method: str, **kwargs: Any) -> OODScore:
    """A new, unfitted score of the named method.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in OOD_METHODS:
        raise ValueError(f"unknown OOD method '{method}'; expected one of {sorted(OOD_METHODS)}")
    return OOD_METHODS[method](**kwargs)


def ood_from_state(state: Mapping[str, Any]) -> OODScore:
    """Rebuild a fitted score from its :meth:`~OODScore.state` (``state["method"]`` names the class).

    Raises:
        ValueError: for an unknown method.
    """
    method = state.get("method")
    if method not in OOD_METHODS:
        raise ValueError(f"unknown OOD method '{method}' in the stored state; expected one of {sorted(OOD_METHODS)}")
    return OOD_METHODS[method].from_state(state)


def _rank(n: int, pass_rate: float, finite_sample: bool) -> int:
    # Rounded first: 0.95 * 20 is 19.000000000000004 in floating point, and its ceiling must be 19.
    return math.ceil(round((n + 1 if finite_sample else n) * float(pass_rate), 9))


def ood_rank_capped(n: int, pass_rate: float, finite_sample: bool = True) -> bool:
    """Whether ``n`` validation scores are too few for :func:`ood_threshold` to promise ``pass_rate`` (its rank is
    capped at the largest score), e.g. fewer than 19 at 0.95 with ``finite_sample``."""
    return _rank(n, pass_rate, finite_sample) > n


def ood_threshold(scores: Any, pass_rate: float = 0.95, margin: float = 0.0, finite_sample: bool = False) -> float:
    """The refusal threshold of an OOD score from in-distribution (validation) scores.

    The base is the smallest observed score such that at least ``pass_rate`` of ``scores`` are at or below it.
    With ``finite_sample`` it is the ``ceil((n + 1) * pass_rate)``-th smallest instead, the rank that lets a *new*
    in-distribution case pass with probability at least ``pass_rate`` (split-conformal); when that rank exceeds
    ``n`` -- too few validation cases to promise the rate (:func:`ood_rank_capped`) -- the largest score is used.
    ``margin`` then moves the threshold away from the median by that share of its distance to the median: a few
    dozen validation cases estimate a tail quantile poorly, and a case from the training distribution that lands just
    beyond it is a false refusal.

    Args:
        scores: ``(N,)`` in-distribution (validation) scores; NaN (no evidence) are ignored.
        pass_rate: share of in-distribution cases that must pass, in ``(0, 1]``.
        margin: non-negative; ``0`` keeps the quantile.
        finite_sample: use the split-conformal rank.

    Returns:
        The threshold (an input passes when its score is ``<=`` it); ``inf`` without scores.

    Raises:
        ValueError: for a pass rate outside ``(0, 1]`` or a negative margin.
    """
    if not 0.0 < float(pass_rate) <= 1.0:
        raise ValueError(f"pass_rate must be in (0, 1], got {pass_rate}")
    if float(margin) < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    scores = np.sort(scores[~np.isnan(scores)])
    if scores.size == 0:
        return float("inf")
    rank = min(_rank(scores.size, pass_rate, finite_sample), scores.size)
    base = float(scores[max(rank, 1) - 1])
    return base + float(margin) * max(base - float(np.median(scores)), 0.0)
