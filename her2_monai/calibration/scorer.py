"""Applying a model's calibration record at inference: temperature, referral and out-of-distribution thresholds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from her2_monai.calibration.ood import OOD_METHODS, OODScore, ood_from_state
from her2_monai.calibration.ood_features import OODInputs
from her2_monai.calibration.record import CALIBRATION_KEY
from her2_monai.constants import SCENARIOS

__all__ = ["DEFAULT_REFER_THRESHOLD", "TrustScorer"]

#: Referral threshold of a model without a calibration record (the bundle's historical default).
DEFAULT_REFER_THRESHOLD = 0.5


class TrustScorer:
    """The calibration record of a model in usable form (see :mod:`her2_monai.calibration.record`).

    Without a record (``calibration=None``) it is the identity: temperature 1, referral at
    :data:`DEFAULT_REFER_THRESHOLD`, no out-of-distribution score.

    Args:
        calibration: the record, or ``None``.
    """

    def __init__(self, calibration: Mapping[str, Any] | None = None) -> None:
        self.record = dict(calibration or {})
        self.temperature = float(self.record.get("temperature", 1.0))
        if not self.temperature > 0:
            raise ValueError(f"the calibration record holds an invalid temperature {self.temperature}")
        self._refer = dict(self.record.get("refer_threshold") or {})
        ood = dict(self.record.get("ood") or {})
        self._ood_thresholds = dict(ood.get("thresholds") or {})
        self.ood_method = ood.get("method")
        self._ood: OODScore | None = None
        if self.ood_method in OOD_METHODS and ood.get("state") is not None:
            self._ood = ood_from_state({**ood["state"], "method": self.ood_method})

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> TrustScorer:
        """From a network's ``metadata`` (its ``calibration`` entry)."""
        return cls((metadata or {}).get(CALIBRATION_KEY))

    @property
    def calibrated(self) -> bool:
        """Whether the model has a calibration record."""
        return bool(self.record)

    @property
    def has_ood(self) -> bool:
        """Whether an out-of-distribution score was fitted."""
        return self._ood is not None

    def refer_threshold(self, scenario: int | str) -> float:
        """The recorded referral threshold of a scenario (id or name)."""
        name = SCENARIOS[scenario] if isinstance(scenario, int) else scenario
        return float(self._refer.get(name, DEFAULT_REFER_THRESHOLD))

    def ood_threshold(self, scenario: int | str) -> float:
        """The recorded OOD threshold of a scenario (NaN without an OOD score)."""
        name = SCENARIOS[scenario] if isinstance(scenario, int) else scenario
        value = self._ood_thresholds.get(name)
        return float(value) if value is not None and self.has_ood else math.nan

    @property
    def ood_inputs(self) -> tuple[str, ...]:
        """The OOD inputs the recorded score reads (:mod:`~her2_monai.calibration.ood_features`; empty without one)."""
        return tuple(self._ood.requires) if self._ood is not None else ()

    def ood_scores(self, logits: Any, embedding: Any, inputs: OODInputs | None = None) -> np.ndarray:
        """``(N,)`` OOD scores (NaN without an OOD score, or where the score has no evidence).

        Args:
            logits: ``(N, C)`` raw logits.
            embedding: ``(N, D)`` pooled embeddings (or ``None`` when the score does not read them).
            inputs: the further inputs of :attr:`ood_inputs` (``image_he``, ...).

        Raises:
            KeyError: naming an input the score reads that was not given.
        """
        n = np.asarray(logits).shape[0]
        if self._ood is None:
            return np.full(n, np.nan)
        given: dict[str, Any] = {"logits": np.asarray(logits, dtype=np.float64), **dict(inputs or {})}
        if embedding is not None:
            given["embedding"] = np.asarray(embedding, dtype=np.float64)
        missing = [name for name in self._ood.requires if name not in given]
        if missing:
            raise KeyError(f"the '{self.ood_method}' OOD score needs the inputs {missing}")
        return self._ood.score_inputs(given)
