"""Checking the records of a datalist JSON before anything is read: every problem named, all at once.

A datalist may be written by hand, edited, or come from an older version. :func:`check_records` checks its records
against the format the bundle uses -- each record an object with at least one stain path (``he``, ``ihc``, or for
inference ``image``), ``label`` an integer 0..3 or null, ``id`` a plain name unique in the list -- and raises one
:class:`~her2_monai.data.datalist.DatalistError` listing every problem with the record it is in. Relative paths are
taken from the datalist's folder (MONAI's convention for decathlon datalists) and returned absolute.

Two checks on the files themselves, both listing every offending record at once: ``require_files`` names each image
that does not exist (a training run would otherwise stop at the first one, deep in a data loader), and ``root``
confines the images to a dataset folder: a path that leads outside it (absolute, or with ``..``) is refused unless
the caller allows it. The folder is compared without resolving symbolic links, so a dataset folder of links into an
image store stays usable.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY, LABEL_KEY

__all__ = ["DatalistError", "check_records", "check_record_id"]

_NUM_CLASSES = len(CLASS_NAMES)


class DatalistError(ValueError):
    """A scan or a datalist has problems; ``problems`` lists ``(path or record, reason)``, every one of them."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{lines}")


def check_record_id(value: Any) -> str | None:
    """Why ``value`` cannot be a record id (it names output files such as ``<id>.json``), or ``None`` if it can."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return f"id must be a string, got {type(value).__name__}"
    text = str(value)
    if not text.strip():
        return "id is empty"
    if any(c in text for c in "/\\\0") or text in (".", "..") or text.startswith("."):
        return f"id {text[:80]!r} is not a plain file name (no '/', '\\', or leading '.'): it names output files"
    return None


def _label_problem(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        hint = ""
        if isinstance(value, str) and value.strip() in CLASS_NAMES:
            hint = f" (write the score {value.strip()} as {CLASS_NAMES.index(value.strip())})"
        return f"label must be an integer 0..{_NUM_CLASSES - 1} or null, got {value!r}{hint}"
    if not 0 <= value < _NUM_CLASSES:
        return f"label {value} is out of range 0..{_NUM_CLASSES - 1} (scores {', '.join(CLASS_NAMES)})"
    return None


def check_records(
    records: Any,
    source: str | os.PathLike,
    stain_keys: Sequence[str] = (HE_KEY, IHC_KEY),
    unique_ids: bool = True,
    base_dir: str | os.PathLike | None = None,
    require_files: bool = False,
    root: str | os.PathLike | None = None,
) -> list[dict]:
    """Check datalist records and return them with absolute paths.

    Args:
        records: the parsed list (anything; a non-list is a problem).
        source: where they came from (the datalist file), for messages.
        stain_keys: keys holding image paths; each record needs at least one of them (a path or null).
        unique_ids: two records with the same ``id`` are a problem (inference renames them instead).
        base_dir: folder that relative paths are taken from (default: the folder of ``source``).
        require_files: every image path must name an existing file.
        root: dataset folder every image must lie in (``None``: no confinement).

    Returns:
        Copies of the records; relative paths made absolute.

    Raises:
        DatalistError: listing every problem as ``(source record N ('id'), reason)``.
    """
    if not isinstance(records, list):
        raise DatalistError([(str(source), f"expected a list of records, got {type(records).__name__}")])
    base = Path(base_dir) if base_dir is not None else Path(source).parent
    inside = None if root is None else os.path.normpath(Path(root).expanduser().absolute())
    problems: list[tuple[str, str]] = []
    checked: list[dict] = []
    ids = Counter(str(r.get("id")) for r in records if isinstance(r, dict) and r.get("id") is not None)
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        if not isinstance(record, dict):
            problems.append((where, f"a record must be an object with {'/'.join(stain_keys)} keys, got {record!r:.60}"))
            continue
        if record.get("id") is not None:
            where += f" ({str(record['id'])[:60]!r})"
            reason = check_record_id(record["id"])
            if reason:
                problems.append((where, reason))
            elif unique_ids and ids[str(record["id"])] > 1:
                problems.append((where, f"id appears {ids[str(record['id'])]} times; ids must be unique"))
        out = dict(record)
        given = 0
        for key in stain_keys:
            value = record.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                problems.append((where, f"'{key}' must be an image path or null, got {value!r:.60}"))
                continue
            path = Path(value).expanduser()
            out[key] = os.path.normpath(path if path.is_absolute() else (base / path).absolute())
            given += 1
            if inside is not None and os.path.commonpath([inside, out[key]]) != inside:
                problems.append((where, f"'{key}' {value!r:.200} lies outside the dataset folder '{inside}'"))
            elif require_files and not os.path.isfile(out[key]):
                problems.append((where, f"'{key}' file not found: {out[key]}"))
        if not given and not any(record.get(k) is not None for k in stain_keys):
            names = ", ".join(repr(k) for k in stain_keys)
            problems.append((where, f"none of {names} is given; at least one is needed"))
        reason = _label_problem(record.get(LABEL_KEY))
        if reason:
            problems.append((where, reason))
        checked.append(out)
    if problems:
        raise DatalistError(problems)
    return checked
