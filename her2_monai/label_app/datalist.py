"""The training datalist built from a MONAI Label datastore.

A MONAI Label local datastore is one flat folder of images (ids = file names without extension). For each image:

* **stain**: the image info's ``stain`` (``he``/``ihc``; set with ``PUT /datastore/image/info``) or a tag in the id:
  a ``he_``/``ihc_`` prefix or a ``_he``/``_ihc`` suffix (any case), e.g. ``00012_train_2+_he.png`` and
  ``00012_train_2+_ihc.png``. Images whose stain cannot be told are skipped and reported.
* **label** (the HER2 score ``0``, ``1+``, ``2+``, ``3+``), first found of: a saved *final* label for the image (a
  label file holding ``2+`` or JSON ``{"label": "2+"}``), the image info's ``label``, or a BCI name
  ``NNNNN_{split}_{score}`` once the stain tag is removed.
* **pairing**: an H&E and an IHC image with the same id once the stain tag is removed form one dual-stain record;
  a lone image gives a single-stain record.
* **split**: BCI names carry ``train``/``val``/``test``; anything else is training. A stratified validation split is
  then carved from training (the bundle's own :func:`~her2_monai.data.datalist.split_validation`).

The result is the bundle's datalist format (``{"training", "validation", "test"}``, records with ``he``, ``ihc``,
``label``), which ``python -m monai.bundle run training --datalist FILE`` reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY, LABEL_KEY, label_from_score
from her2_monai.data.datalist import split_validation

__all__ = [
    "DatastoreLike",
    "DatalistReport",
    "parse_image_id",
    "read_label_file",
    "score_to_label",
    "build_train_datalist",
]

_TAG_SUFFIX = re.compile(r"^(?P<base>.+?)[_\-.](?P<stain>he|ihc)$", re.IGNORECASE)
_TAG_PREFIX = re.compile(r"^(?P<stain>he|ihc)[_\-.](?P<base>.+)$", re.IGNORECASE)
_BCI_NAME = re.compile(r"^(?P<index>\d+)_(?P<split>train|test|val)_(?P<score>[^.]+)$")
_SPLITS = {"train": "training", "val": "validation", "test": "test"}
_STAIN_NAMES = {"he": HE_KEY, "h&e": HE_KEY, "h_e": HE_KEY, "ihc": IHC_KEY, "her2": IHC_KEY, "her2-ihc": IHC_KEY}
_MAX_LABEL_FILE = 4096


class DatastoreLike(Protocol):
    """The part of MONAI Label's ``Datastore`` interface this module uses."""

    def list_images(self) -> list[str]: ...

    def get_image_uri(self, image_id: str) -> str: ...

    def get_image_info(self, image_id: str) -> dict[str, Any]: ...

    def get_label_by_image_id(self, image_id: str, tag: str) -> str: ...

    def get_label_uri(self, label_id: str, label_tag: str) -> str: ...


@dataclass
class DatalistReport:
    """What :func:`build_train_datalist` skipped (``(image id, reason)``) and counted."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: counts per split and class, and the skipped ids with their reasons."""
        return {"counts": self.counts, "skipped": [{"image": i, "reason": r} for i, r in self.skipped]}


def parse_image_id(image_id: str, info: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """``(pair key, stain)`` of a datastore image: the stain from the info's ``stain`` or from a tag in the id.

    Args:
        image_id: the datastore id (file name without extension).
        info: the image's datastore info.

    Returns:
        The id without its stain tag (the key that pairs H&E with IHC) and ``"he"``, ``"ihc"`` or ``None``.
    """
    declared = str((info or {}).get("stain") or "").strip().lower()
    for pattern in (_TAG_SUFFIX, _TAG_PREFIX):
        match = pattern.match(image_id)
        if match:
            base, tagged = match.group("base"), match.group("stain").lower()
            return base, _STAIN_NAMES.get(declared, tagged)
    return image_id, _STAIN_NAMES.get(declared)


def read_label_file(path: str | Path) -> int:
    """The HER2 label in a small label file: ``2+`` (text) or JSON ``{"label": "2+"}`` / ``{"her2_score": 2}``.

    Raises:
        ValueError: if the file is too large, or holds no readable HER2 score.
    """
    path = Path(path)
    if path.stat().st_size > _MAX_LABEL_FILE:
        raise ValueError(f"label file is larger than {_MAX_LABEL_FILE} bytes; expected a HER2 score")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = text
    if isinstance(content, dict):
        content = content.get("label", content.get("her2_score", content.get("score")))
    return score_to_label(content)


def score_to_label(value: Any) -> int:
    """A HER2 score given as an index (``0``..``3``) or a name (``"0"``, ``"1+"``, ``"2+"``, ``"3+"``) -> 0..3.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"'{value}' is not a HER2 score")
    if isinstance(value, int):
        if 0 <= value < len(CLASS_NAMES):
            return value
        raise ValueError(f"label {value} is out of range 0..{len(CLASS_NAMES) - 1}")
    return label_from_score(str(value))


def _label_of(datastore: DatastoreLike, image_id: str, base: str, info: Mapping[str, Any]) -> tuple[int | None, str]:
    """``(label, source)``; ``source`` names where it came from, or the problem when ``label`` is ``None``."""
    try:
        label_id = datastore.get_label_by_image_id(image_id, "final")
    except Exception:  # noqa: BLE001 - a datastore without labels for this image
        label_id = ""
    if label_id:
        try:
            return read_label_file(datastore.get_label_uri(label_id, "final")), "label file"
        except (OSError, ValueError) as err:
            return None, f"unreadable label file: {err}"
    for key in ("label", "her2_score"):
        if info.get(key) not in (None, ""):
            try:
                return score_to_label(info[key]), "image info"
            except ValueError as err:
                return None, f"bad '{key}' in the image info: {err}"
    match = _BCI_NAME.match(base)
    if match:
        try:
            return label_from_score(match.group("score")), "file name"
        except ValueError as err:
            return None, f"unreadable score in the file name: {err}"
    return None, "no HER2 label (no label file, no 'label' in the image info, no BCI name NNNNN_{split}_{score})"


def build_train_datalist(
    datastore: DatastoreLike, val_fraction: float = 0.15, seed: int = 0
) -> tuple[dict[str, list[dict]], DatalistReport]:
    """Build the bundle's training datalist from the images of a MONAI Label datastore (rules: module docstring).

    Args:
        datastore: the app's datastore.
        val_fraction: fraction of each class of the training records moved to validation.
        seed: seed of that stratified draw.

    Returns:
        ``(datalist, report)``: the datalist has ``training``, ``validation`` and ``test`` lists of records with
        ``id``, ``he`` and ``ihc`` (paths or ``None``) and ``label`` (0..3); the report lists skipped images.
    """
    report = DatalistReport()
    groups: dict[str, dict[str, Any]] = {}
    for image_id in sorted(datastore.list_images()):
        info = datastore.get_image_info(image_id) or {}
        base, stain = parse_image_id(image_id, info)
        if stain is None:
            report.skipped.append(
                (image_id, "stain unknown: tag the id (..._he / ..._ihc) or set 'stain' in the image info")
            )
            continue
        label, source = _label_of(datastore, image_id, base, info)
        if label is None:
            report.skipped.append((image_id, source))
            continue
        group = groups.setdefault(base, {"ids": {}})
        if stain in group:
            report.skipped.append((image_id, f"a second {stain} image for '{base}' ({group['ids'][stain]})"))
            continue
        group[stain] = datastore.get_image_uri(image_id)
        group["ids"][stain] = image_id
        group.setdefault("labels", {})[stain] = label
    splits: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for base, group in sorted(groups.items()):
        labels = set(group["labels"].values())
        if len(labels) > 1:
            names = {s: CLASS_NAMES[v] for s, v in group["labels"].items()}
            for image_id in group["ids"].values():
                report.skipped.append((image_id, f"the H&E and IHC labels of '{base}' disagree: {names}"))
            continue
        match = _BCI_NAME.match(base)
        split = _SPLITS[match.group("split")] if match else "training"
        record = {"id": base, HE_KEY: group.get(HE_KEY), IHC_KEY: group.get(IHC_KEY), LABEL_KEY: labels.pop()}
        splits[split].append(record)
    if not splits["validation"]:
        splits["training"], splits["validation"] = split_validation(splits["training"], val_fraction, seed)
    for split, records in splits.items():
        counts = {name: 0 for name in CLASS_NAMES}
        for record in records:
            counts[CLASS_NAMES[record[LABEL_KEY]]] += 1
        report.counts[split] = counts
    return splits, report
