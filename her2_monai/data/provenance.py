"""What a model was trained on: the ``training_data`` record of ``models/model.pt`` and what answers say about it.

Stage 2 stores the record in the classifier's metadata (``model_metadata`` in ``train.json``, saved with the
network's architecture record, see :mod:`her2_monai.networks.record`), computed from the datalist file the run
trained from::

    {"version": 1, "source": "demo" | "dataset", "dataset_dir": "<as given, '' for the demo>",
     "datalist_sha256": "<64 hex digits>",
     "splits": {"training": {"records": N, "classes": {"0": n, "1+": n, "2+": n, "3+": n, "unlabelled": n},
                             "stains": {"dual": n, "he_only": n, "ihc_only": n}},
                "validation": {...}, "test": {...}}}

A few hundred bytes: counts only, no file names. The image size and the stain normalisation stay where they were
(``metadata["image_size"]``, ``metadata["stain_normalization"]``).

Every answer of the model (``predict``, ``run inferring``, the MONAI Label app, ``slide.json``), the evaluation report
and the MLflow runs carry :func:`model_provenance` (source, dataset name, datalist hash prefix) and
:func:`provenance_warnings`: a model trained on the synthetic demo data says on every answer that its scores are not
valid for real tissue, and a model file without the record (written by an older version) says that its training data
are unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY, LABEL_KEY, SCENARIOS

__all__ = [
    "TRAINING_DATA_KEY",
    "DEMO_SOURCE",
    "DATASET_SOURCE",
    "UNKNOWN_SOURCE",
    "DEMO_WARNING",
    "UNKNOWN_WARNING",
    "training_data",
    "model_provenance",
    "provenance_warnings",
    "provenance_tags",
]

#: Key of the record in the model's metadata.
TRAINING_DATA_KEY = "training_data"
TRAINING_DATA_VERSION = 1
DEMO_SOURCE, DATASET_SOURCE, UNKNOWN_SOURCE = "demo", "dataset", "unknown"
#: Hexadecimal digits of the datalist's SHA-256 quoted in answers (the full digest is in the model file).
HASH_PREFIX = 12
#: Splits counted, in the bundle's datalist order.
SPLITS = ("training", "validation", "test")

DEMO_WARNING = "this model was trained on the synthetic demo data: its scores are not valid for real tissue"
UNKNOWN_WARNING = (
    "the model file does not record what it was trained on (written by an older version): check where it comes "
    "from before trusting its scores"
)


def _counts(records: Sequence[Any]) -> dict[str, Any]:
    classes = dict.fromkeys((*CLASS_NAMES, "unlabelled"), 0)
    stains = dict.fromkeys(SCENARIOS, 0)
    for record in records:
        if not isinstance(record, Mapping):
            continue
        label = record.get(LABEL_KEY)
        valid = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(CLASS_NAMES)
        classes[CLASS_NAMES[label] if valid else "unlabelled"] += 1
        he, ihc = bool(record.get(HE_KEY)), bool(record.get(IHC_KEY))
        if he or ihc:
            stains[SCENARIOS[0 if he and ihc else 1 if he else 2]] += 1
    return {"records": len(records), "classes": classes, "stains": stains}


def training_data(datalist: str | os.PathLike, dataset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``training_data`` record of a run that trains from ``datalist`` (see the module docstring).

    Args:
        datalist: the datalist JSON the run trains from (``@datalist`` in ``train.json``), a dict of splits.
        dataset_dir: the dataset folder as given (``--dataset_dir``); empty or ``None`` = the built-in demo data.

    Returns:
        The record. A datalist not written yet (a network built before the data step, which is never trained so)
        gives ``datalist_sha256`` null and no ``splits``.

    Raises:
        ValueError: if the datalist is not valid JSON.
    """
    record: dict[str, Any] = {
        "version": TRAINING_DATA_VERSION,
        "source": DATASET_SOURCE if dataset_dir else DEMO_SOURCE,
        "dataset_dir": str(dataset_dir or ""),
        "datalist_sha256": None,
        "splits": {},
    }
    path = Path(datalist)
    if not path.is_file():
        return record
    content = path.read_bytes()  # read once: the digest is of exactly the bytes counted
    try:
        splits = json.loads(content)
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist '{path}' is not valid JSON: {err}") from None
    record["datalist_sha256"] = hashlib.sha256(content).hexdigest()
    if isinstance(splits, Mapping):
        record["splits"] = {s: _counts(splits.get(s) or []) for s in SPLITS}
    return record


def model_provenance(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """What answers say about a model's training data, from its metadata.

    Args:
        metadata: the classifier's record metadata (``net.metadata``, or ``record["metadata"]`` of a state dict).

    Returns:
        ``{"source": "demo" | "dataset" | "unknown", "dataset": name or null, "datalist_sha256": first
        :data:`HASH_PREFIX` hex digits or null}``; the dataset name is ``"demo"`` or the dataset folder's name
        (``/data/BCI`` -> ``BCI``). ``unknown`` for a model file without the record.
    """
    record = (metadata or {}).get(TRAINING_DATA_KEY)
    if not isinstance(record, Mapping) or record.get("source") not in (DEMO_SOURCE, DATASET_SOURCE):
        return {"source": UNKNOWN_SOURCE, "dataset": None, "datalist_sha256": None}
    folder = str(record.get("dataset_dir") or "")
    name = DEMO_SOURCE if record["source"] == DEMO_SOURCE else (Path(folder).name or folder or None)
    digest = record.get("datalist_sha256")
    return {
        "source": str(record["source"]),
        "dataset": name,
        "datalist_sha256": str(digest)[:HASH_PREFIX] if digest else None,
    }


def provenance_warnings(provenance: Mapping[str, Any] | None) -> list[str]:
    """The warnings every answer of a model with this :func:`model_provenance` carries.

    Returns:
        ``[DEMO_WARNING]`` for the demo data, ``[UNKNOWN_WARNING]`` for unknown training data, else ``[]``.
    """
    source = (provenance or {}).get("source", UNKNOWN_SOURCE)
    if source == DEMO_SOURCE:
        return [DEMO_WARNING]
    return [] if source == DATASET_SOURCE else [UNKNOWN_WARNING]


def provenance_tags(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """MLflow tags of a run that trains or evaluates the model with this metadata.

    Returns:
        ``her2_monai.training_data.source``, ``.dataset``, ``.datalist_sha256`` (the full digest) and ``.records``
        (per split), plus ``her2_monai.warning`` when answers carry a warning.
    """
    provenance = model_provenance(metadata)
    record = (metadata or {}).get(TRAINING_DATA_KEY)
    record = record if isinstance(record, Mapping) else {}
    splits = record.get("splits") if isinstance(record.get("splits"), Mapping) else {}
    tags = {
        "her2_monai.training_data.source": provenance["source"],
        "her2_monai.training_data.dataset": str(provenance["dataset"] or ""),
        "her2_monai.training_data.datalist_sha256": str(record.get("datalist_sha256") or ""),
        "her2_monai.training_data.records": ", ".join(
            f"{split} {counts.get('records', 0)}" for split, counts in splits.items() if isinstance(counts, Mapping)
        ),
    }
    warnings = provenance_warnings(provenance)
    if warnings:
        tags["her2_monai.warning"] = "; ".join(warnings)
    return tags
