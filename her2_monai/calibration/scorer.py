"""Applying a model's calibration record at inference: temperature, referral and out-of-distribution thresholds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from her2_monai.calibration.ood import OOD_METHODS, OODScore
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
            self._ood = OOD_METHODS[self.ood_method].from_state(ood["state"])

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

    def ood_scores(self, logits: Any, embedding: Any) -> np.ndarray:
        """``(N,)`` OOD scores of raw logits and embeddings (NaN without an OOD score)."""
        n = np.asarray(logits).shape[0]
        if self._ood is None:
            return np.full(n, np.nan)
        return self._ood.score(np.asarray(logits, dtype=np.float64), np.asarray(embedding, dtype=np.float64))
