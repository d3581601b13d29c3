"""The stain normalisation a deployed model applies: as recorded in its model file, or as configured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from her2_monai.networks.factory import TRAIN_COMMAND, network_record, read_weights
from her2_monai.transforms.stain_normalization import StainReference
from her2_monai.transforms.stain_settings import RECORD_KEY, references_from_record

__all__ = ["recorded_normalization", "model_stain_references"]


def recorded_normalization(model_file: str | os.PathLike) -> dict[str, Any] | None:
    """The normalisation record in a model file's metadata (``None``: none recorded, or no file yet).

    Raises:
        ValueError: for a damaged or foreign model file.
    """
    if not Path(model_file).is_file():
        return None
    record = network_record(read_weights(model_file, "trained HER2 classifier", TRAIN_COMMAND))
    return ((record or {}).get("metadata") or {}).get(RECORD_KEY)


def model_stain_references(
    model_file: str | os.PathLike,
    method: str | None = None,
    reference: Any = None,
    reference_ihc: Any = None,
) -> dict[str, StainReference | None]:
    """One reference per stain for evaluation and inference.

    Args:
        model_file: ``models/model.pt``.
        method: ``None`` = as recorded in the model file; ``none`` = off; a method = use the given references.
        reference: the H&E target for a given method.
        reference_ihc: the IHC target for a given method.

    Returns:
        ``{"he": reference or None, "ihc": reference or None}``.

    Raises:
        ValueError: for a damaged record or an unusable configured reference.
    """
    record = recorded_normalization(model_file) if method in (None, "") else None
    return references_from_record(record, method, reference, reference_ihc)
