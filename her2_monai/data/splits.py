"""Validation splits that keep the patches of one slide together, and the check of what a split left in each class.

BCI's 4,870 patches come from 51 slides and carry the slide's HER2 score; neighbouring patches of one slide share its
staining, scanner and tissue, so a validation split drawn patch by patch puts near-duplicates of training patches in
validation and makes validation accuracy optimistic. BCI file names carry no slide id. Two ways to group patches:

* ``id_block:N`` -- patches whose numeric ids fall in the same block of ``N`` consecutive ids (``id // N``) form one
  group: ``00000``-``00007`` is block 0 for ``N = 8``. For BCI this is a guess that neighbouring ids share a slide.
* ``csv:PATH`` -- a CSV with an id column (``id``, ``name`` or ``file``: the file stem ``00012_train_1+``, the file
  name, or the bare number ``00012``) and a group column (``slide`` or ``group``), for datasets whose slides are known.

Whole groups then go to validation, class by class, until each class has about ``val_fraction`` of its patches there
(:func:`group_split`). :func:`split_coverage` names the classes a split left empty on one side.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from her2_monai.constants import CLASS_NAMES, LABEL_KEY

__all__ = ["SplitBy", "parse_split_by", "record_groups", "group_split", "split_coverage", "describe_split"]

_LEADING_NUMBER = re.compile(r"^(\d+)")
_ID_COLUMNS = ("id", "name", "file")
_GROUP_COLUMNS = ("slide", "group")
_MAX_LISTED = 8


@dataclass(frozen=True)
class SplitBy:
    """A parsed ``split_by`` setting.

    Attributes:
        kind: ``"record"`` (patch-level, the default), ``"id_block"`` or ``"csv"``.
        block: ids per block for ``"id_block"``.
        path: the CSV file for ``"csv"``.
    """

    kind: str = "record"
    block: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.kind == "id_block":
            return f"id_block:{self.block}"
        if self.kind == "csv":
            return f"csv:{self.path}"
        return "record"


def parse_split_by(value: str | SplitBy | None) -> SplitBy:
    """Read a ``split_by`` setting: ``""``/``None``/``"record"``, ``"id_block:N"`` or ``"csv:PATH"``.

    Args:
        value: the setting as given on the command line or in the config.

    Returns:
        The parsed setting.

    Raises:
        ValueError: for any other value, a block size below 1, or a CSV that does not exist.
    """
    if isinstance(value, SplitBy):
        return value
    text = "" if value is None else str(value).strip()
    if text in ("", "record", "patch", "none"):
        return SplitBy()
    kind, _, arg = text.partition(":")
    if kind == "id_block":
        try:
            block = int(arg)
        except ValueError:
            block = 0
        if block < 1:
            raise ValueError(f"split_by '{text}': expected id_block:N with N a whole number >= 1 (e.g. id_block:8)")
        return SplitBy("id_block", block=block)
    if kind == "csv":
        path = Path(arg).expanduser()
        if not arg or not path.is_file():
            raise ValueError(f"split_by '{text}': the group CSV '{arg}' does not exist (expected csv:PATH)")
        return SplitBy("csv", path=path)
    raise ValueError(f"split_by must be '' (patch-level), 'id_block:N' or 'csv:PATH', got '{text}'")


def _record_number(record: dict) -> int | None:
    match = _LEADING_NUMBER.match(str(record.get("id", "")))
    return int(match.group(1)) if match else None


def _read_group_csv(path: Path) -> tuple[dict[str, str], dict[int, str]]:
    """``(by_stem, by_number)`` lookups from a group CSV."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        id_col = next((c for c in _ID_COLUMNS if c in columns), None)
        group_col = next((c for c in _GROUP_COLUMNS if c in columns), None)
        if id_col is None or group_col is None:
            raise ValueError(
                f"group CSV '{path}' needs an id column ({', '.join(_ID_COLUMNS)}) and a group column "
                f"({', '.join(_GROUP_COLUMNS)}); found columns {columns}"
            )
        original = {c.strip().lower(): c for c in reader.fieldnames or []}
        by_stem: dict[str, str] = {}
        by_number: dict[int, str] = {}
        for line, row in enumerate(reader, start=2):
            key, group = (row.get(original[id_col]) or "").strip(), (row.get(original[group_col]) or "").strip()
            if not key or not group:
                raise ValueError(f"group CSV '{path}' line {line}: empty {id_col} or {group_col}")
            stem = Path(key).stem
            if stem.isdigit():
                by_number[int(stem)] = group
            else:
                by_stem[stem] = group
    return by_stem, by_number


def record_groups(records: list[dict], split_by: str | SplitBy | None) -> list[str]:
    """The group of each record under ``split_by`` (patch-level: every record is its own group).

    Args:
        records: datalist records with an ``id`` (the file stem, e.g. ``00012_train_1+``).
        split_by: see :func:`parse_split_by`.

    Returns:
        One group name per record, in order.

    Raises:
        ValueError: if an id has no leading number (``id_block``), or labelled records have no row in the CSV.
    """
    spec = parse_split_by(split_by)
    if spec.kind == "record":
        return [f"record:{i}" for i in range(len(records))]
    if spec.kind == "id_block":
        groups = []
        for record in records:
            number = _record_number(record)
            if number is None:
                raise ValueError(
                    f"split_by {spec}: record id '{record.get('id')}' does not start with a number "
                    "(BCI names are NNNNN_{split}_{score}); use csv:PATH to give groups explicitly"
                )
            groups.append(f"block:{number // spec.block}")
        return groups
    by_stem, by_number = _read_group_csv(spec.path)
    groups, missing = [], []
    for i, record in enumerate(records):
        stem = str(record.get("id", ""))
        number = _record_number(record)
        group = by_stem.get(stem) or (by_number.get(number) if number is not None else None)
        if group is None:
            if record.get(LABEL_KEY) is not None:
                missing.append(stem)
            group = f"unlisted:{i}"
        groups.append(group)
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED]) + (
            f", ... ({len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        )
        raise ValueError(
            f"group CSV '{spec.path}' has no row for {len(missing)} labelled record(s): {shown}; "
            "add one row per patch (id = file stem or number, slide = its slide)"
        )
    return groups


def group_split(
    records: list[dict], groups: list[str], val_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Move whole groups of labelled records to validation, class by class, seeded.

    A group belongs to the class most of its labelled records have (BCI labels are slide-level, so a slide has one).
    For each class the groups are shuffled and each is taken when it brings the class's validation count closer to
    ``round(n * val_fraction)`` (at least one group when the class has two or more: the smallest, if every group
    overshoots); a class always keeps one group in training. scikit-learn's ``StratifiedGroupKFold`` gives folds of
    ``1/k`` with no per-class minimum, while a ``val_fraction`` and small datasets need both. Unlabelled records stay
    in training.

    Args:
        records: training records.
        groups: one group name per record (:func:`record_groups`).
        val_fraction: fraction in ``[0, 1)``.
        seed: random seed.

    Returns:
        ``(training, validation)``, each in the order of ``records``.
    """
    members: dict[str, list[int]] = {}
    for i, (record, group) in enumerate(zip(records, groups)):
        if record.get(LABEL_KEY) is not None:
            members.setdefault(group, []).append(i)
    by_class: dict[int, list[str]] = {}
    for group, indices in sorted(members.items()):
        counts = Counter(int(records[i][LABEL_KEY]) for i in indices)
        label = min(counts, key=lambda c: (-counts[c], c))
        by_class.setdefault(label, []).append(group)
    rng = np.random.default_rng(seed)
    val_idx: set[int] = set()
    for label in sorted(by_class):
        class_groups = by_class[label]
        n_records = sum(len(members[g]) for g in class_groups)
        target = int(round(n_records * val_fraction))
        if target == 0 and len(class_groups) >= 2 and val_fraction > 0:
            target = 1
        order = [class_groups[g] for g in rng.permutation(len(class_groups)).tolist()]
        chosen: list[str] = []
        taken = 0
        for group in order:
            if len(chosen) == len(class_groups) - 1 or taken >= target:
                break
            size = len(members[group])
            if abs(taken + size - target) < abs(taken - target):
                chosen.append(group)
                taken += size
        if not chosen and target and len(class_groups) >= 2:
            chosen.append(min(order, key=lambda g: len(members[g])))  # every group overshoots: the smallest one
        for group in chosen:
            val_idx.update(members[group])
    training = [r for i, r in enumerate(records) if i not in val_idx]
    validation = [r for i, r in enumerate(records) if i in val_idx]
    return training, validation


def split_coverage(training: list[dict], validation: list[dict]) -> list[str]:
    """Name each class that a validation split left empty in training, or in validation although it has data.

    Args:
        training: training records.
        validation: validation records.

    Returns:
        One line per problem (empty when every class with data is on both sides).
    """
    train = Counter(int(r[LABEL_KEY]) for r in training if r.get(LABEL_KEY) is not None)
    val = Counter(int(r[LABEL_KEY]) for r in validation if r.get(LABEL_KEY) is not None)
    lines = []
    for label, name in enumerate(CLASS_NAMES):
        if val[label] and not train[label]:
            lines.append(
                f"class {name}: no training records (all {val[label]} are in validation); the classifier cannot "
                "learn it -- add data or lower --val_fraction"
            )
        elif train[label] and not val[label] and sum(val.values()):
            lines.append(
                f"class {name}: {train[label]} training record(s) and none in validation; its validation recall and "
                "F1 are undefined -- raise --val_fraction or add data"
            )
    return lines


def describe_split(spec: SplitBy, n_groups: int, n_val_groups: int) -> str:
    """One line on how validation was drawn.

    Args:
        spec: the split setting.
        n_groups: groups of labelled training records before the split.
        n_val_groups: groups moved to validation.

    Returns:
        The line.
    """
    if spec.kind == "record":
        return (
            "validation drawn patch by patch (stratified by class): patches of one slide can fall on both sides, "
            "which makes validation optimistic; --split_by id_block:N or csv:PATH keeps slides together"
        )
    return f"validation drawn by {spec}: {n_val_groups} of {n_groups} groups in validation, none shared with training"
