"""The calibration record stored with the model: ``metadata["calibration"]`` of ``models/model.pt``.

The classifier's state dict carries its :class:`~her2_monai.networks.record.RecordedNetwork` record under
``_extra_state`` (plain data, read with ``torch.load(..., weights_only=True)``); the calibration fitted at the end
of training is one more entry of that record's ``metadata``, so the one model file says how to turn its logits into
calibrated probabilities, when to refer a case and how unlike its training data an input is::

    {"version": 1, "temperature": T,
     "refer_threshold": {"dual": t, "he_only": t, "ihc_only": t},
     "refer": {"target_accuracy": 0.95, "<scenario>": {"threshold", "target_met", "coverage", "accuracy", "n"}},
     "ood": {"method": "mahalanobis", "pass_rate": 0.95, "thresholds": {"<scenario>": s}, "state": {...}},
     "validation": {"n", "ece_before", "ece_after", "nll_before", "nll_after", ...}, "n_training": N}

:func:`write_calibration` rewrites the file atomically with only that entry changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from her2_monai.fileio import atomic_torch_save
from her2_monai.networks.factory import CLASSIFIERS, TRAIN_COMMAND, network_record, read_weights
from her2_monai.networks.record import plain

__all__ = ["CALIBRATION_KEY", "CALIBRATION_VERSION", "read_calibration", "write_calibration"]

#: Key of the calibration record in the model's metadata.
CALIBRATION_KEY = "calibration"
CALIBRATION_VERSION = 1


def read_calibration(model_file: str | os.PathLike) -> dict[str, Any] | None:
    """The calibration record of a model file (``None`` when it has none, e.g. a file from an older version).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not a model file of this bundle.
    """
    state = read_weights(model_file, "trained HER2 classifier", TRAIN_COMMAND)
    record = network_record(state) or {}
    calibration = (record.get("metadata") or {}).get(CALIBRATION_KEY)
    return dict(calibration) if isinstance(calibration, Mapping) else None


def write_calibration(model_file: str | os.PathLike, calibration: Mapping[str, Any]) -> None:
    """Store ``calibration`` in the model file's record, replacing any earlier one; the weights are untouched.

    Args:
        model_file: ``models/model.pt``.
        calibration: the record (plain data; tuples become lists).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it has no architecture record of this bundle.
    """
    state = read_weights(model_file, "trained HER2 classifier", TRAIN_COMMAND)
    record = network_record(state)
    if record is None or record.get("class") not in ("HER2FlexibleNet", *CLASSIFIERS):
        raise ValueError(f"'{model_file}' does not hold a HER2 classifier written by this bundle; not calibrating it")
    metadata = dict(record.get("metadata") or {})
    metadata[CALIBRATION_KEY] = plain(dict(calibration))
    state["_extra_state"] = {**record, "metadata": metadata}
    atomic_torch_save(state, model_file, checksum=True)
