"""Scan a BCI-layout folder (or side-by-side "AB" pair images) into a MONAI decathlon-style datalist.

Accepted layouts under ``dataset_dir`` (any mix):

* ``HE/{train,test}/NAME`` and ``IHC/{train,test}/NAME`` — the BCI layout; files paired by name.
* ``HE/NAME`` and ``IHC/NAME`` with no split folders (e.g. MIST samples) — all go to the training pool.
* ``AB/{train,test}/NAME`` or ``AB/NAME`` — one 2W x H image per pair, H&E and IHC side by side in either order. The
  halves are told apart from their stain colours (:func:`her2_monai.stain_features.order_he_ihc`) and written as
  lossless PNGs under ``pairs_dir`` (next to the datalist), so every later step sees ordinary BCI-style records.

Labels come from BCI names ``NNNNN_{split}_{score}.ext`` (score ``0``, ``1+``, ``2+``, ``3+``). A name in that form with
an unreadable score is a problem; a name that does not use the form at all (MIST) gives an unlabelled record
(``label: null``): usable to train the stain-translation GAN, ignored by the classifier. ``require_labels=True`` makes
unlabelled records problems instead.

A file with no partner becomes a single-modality record (the other stain ``null``) and is listed in the report;
``strict=True`` makes it a problem. Corrupt files, unreadable labels and size mismatches within a pair are collected
together with their reasons. In strict mode any problem fails the scan; otherwise the affected records are skipped and
listed.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from her2_monai.constants import CLASS_NAMES, HE_KEY, IHC_KEY, LABEL_KEY, SCENARIOS, label_from_score
from her2_monai.data.image_reader import ImageReadError, probe_image, read_rgb
from her2_monai.data.splits import SplitBy, describe_split, group_split, parse_split_by, record_groups, split_coverage
from her2_monai.data.validate import DatalistError, check_records
from her2_monai.fileio import save_image_atomic, write_json_atomic
from her2_monai.stain_batch import scenario_id
from her2_monai.stain_features import order_he_ihc

__all__ = [
    "DatalistError",
    "ScanReport",
    "scan_dataset",
    "split_validation",
    "build_datalist",
    "write_datalist",
    "read_datalist_json",
    "load_datalist_split",
    "select_records",
    "class_weights",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_BCI_NAME = re.compile(r"^(?P<index>\d+)_(?P<split>train|test|val)_(?P<score>[^.]+)$")
_SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "test"}


@dataclass
class ScanReport:
    """What a scan found: problems, skipped files, unpaired and unlabelled records."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    unlabelled: int = 0
    ab_pairs: int = 0
    #: How validation was drawn (empty when the dataset brought its own ``val`` split).
    split_info: str = ""
    #: Classes a validation split left empty in training, or in validation although they have data.
    split_warnings: list[str] = field(default_factory=list)

    def summary(self, datalist: dict[str, list[dict]]) -> str:
        """Human-readable counts per split, class and scenario, then every problem with its reason."""
        lines = []
        for split, records in datalist.items():
            classes = Counter(CLASS_NAMES[r[LABEL_KEY]] if r.get(LABEL_KEY) is not None else "none" for r in records)
            scenarios = Counter(_scenario(r) for r in records)
            cls = ", ".join(f"{k}: {classes[k]}" for k in (*CLASS_NAMES, "none") if classes[k])
            scn = ", ".join(f"{k}: {scenarios[k]}" for k in SCENARIOS if scenarios[k])
            lines.append(f"{split}: {len(records)} records | classes {cls or '-'} | scenarios {scn or '-'}")
        if self.ab_pairs:
            lines.append(f"side-by-side AB images split into pairs: {self.ab_pairs}")
        if self.unlabelled:
            lines.append(f"unlabelled records (label null; used for stain translation only): {self.unlabelled}")
        if self.unpaired:
            lines.append(f"files without a partner stain (single-modality records): {len(self.unpaired)}")
            lines.extend(f"  {p}" for p in self.unpaired)
        if self.split_info:
            lines.append(self.split_info)
        lines.extend(f"WARNING: {line}" for line in self.split_warnings)
        if self.problems:
            lines.append(f"problems ({len(self.problems)}; affected files skipped):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.problems)
        return "\n".join(lines)


def _scenario(record: dict) -> str:
    return SCENARIOS[scenario_id(record.get(HE_KEY) is not None, record.get(IHC_KEY) is not None)]


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name: p.resolve() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _parse_label(name: str, require_labels: bool) -> tuple[int | None, str | None]:
    """Return ``(label, problem)`` for a file name."""
    match = _BCI_NAME.match(Path(name).stem)
    if match is None:
        if require_labels:
            return None, "no HER2 score in the file name (expected NNNNN_{split}_{0|1+|2+|3+})"
        return None, None
    try:
        return label_from_score(match.group("score")), None
    except ValueError as err:
        return None, f"unparsable label: {err}"


def _split_of(folder_name: str | None, name: str) -> str:
    if folder_name in _SPLIT_FOLDERS:
        return _SPLIT_FOLDERS[folder_name]
    match = _BCI_NAME.match(Path(name).stem)
    return _SPLIT_FOLDERS[match.group("split")] if match else "training"


def _split_sources(root: Path) -> list[tuple[str | None, Path]]:
    """``(split folder name or None, folder)`` for a stain folder with or without split subfolders."""
    subs = [(name, root / name) for name in _SPLIT_FOLDERS if (root / name).is_dir()]
    return subs if subs else [(None, root)]


def _scan_paired(dataset_dir: Path, require_labels: bool, strict: bool, report: ScanReport) -> list[tuple[str, dict]]:
    out = []
    he_root, ihc_root = dataset_dir / "HE", dataset_dir / "IHC"
    split_names = {s for s, _ in _split_sources(he_root)} | {s for s, _ in _split_sources(ihc_root)}
    for split_name in sorted(split_names, key=str):
        he_files = _images(he_root / split_name if split_name else he_root)
        ihc_files = _images(ihc_root / split_name if split_name else ihc_root)
        for name in sorted(set(he_files) | set(ihc_files)):
            he_path, ihc_path = he_files.get(name), ihc_files.get(name)
            bad = False
            sizes = {}
            for stain, path in ((HE_KEY, he_path), (IHC_KEY, ihc_path)):
                if path is None:
                    continue
                try:
                    sizes[stain] = probe_image(path)
                except ImageReadError as err:
                    report.problems.append((err.path, err.reason))
                    bad = True
            label, problem = _parse_label(name, require_labels)
            if problem:
                report.problems.append((str(he_path or ihc_path), problem))
                bad = True
            if len(sizes) == 2 and sizes[HE_KEY] != sizes[IHC_KEY]:
                (hw, hh), (iw, ih) = sizes[HE_KEY], sizes[IHC_KEY]
                report.problems.append((str(he_path), f"size mismatch within the pair: H&E {hw}x{hh}, IHC {iw}x{ih}"))
                bad = True
            if he_path is None or ihc_path is None:
                lonely = he_path or ihc_path
                missing = "IHC" if ihc_path is None else "H&E"
                if strict:
                    report.problems.append((str(lonely), f"no {missing} partner with the same file name"))
                    bad = True
                else:
                    report.unpaired.append(str(lonely))
            if bad:
                continue
            if label is None:
                report.unlabelled += 1
            record = {HE_KEY: str(he_path) if he_path else None, IHC_KEY: str(ihc_path) if ihc_path else None}
            record[LABEL_KEY] = label
            record["id"] = Path(name).stem
            out.append((_split_of(split_name, name), record))
    return out


def _scan_ab(dataset_dir: Path, pairs_dir: Path, require_labels: bool, report: ScanReport) -> list[tuple[str, dict]]:
    out = []
    ab_root = dataset_dir / "AB"
    for split_name, folder in _split_sources(ab_root):
        for name, path in _images(folder).items():
            label, problem = _parse_label(name, require_labels)
            if problem:
                report.problems.append((str(path), problem))
                continue
            try:
                image = read_rgb(path)
            except ImageReadError as err:
                report.problems.append((err.path, err.reason))
                continue
            height, width = image.shape[:2]
            if width != 2 * height:
                report.problems.append(
                    (str(path), f"side-by-side pair must be 2H x H (e.g. 2048x1024), got {width}x{height}")
                )
                continue
            left, right = image[:, :height], image[:, height:]
            try:
                left_is_he, _ = order_he_ihc(left, right)
            except ValueError as err:
                report.problems.append((str(path), str(err)))
                continue
            he, ihc = (left, right) if left_is_he else (right, left)
            stem = Path(name).stem
            target = {}
            for stain, pixels in ((HE_KEY, he), (IHC_KEY, ihc)):
                dest = pairs_dir / stain.upper() / (split_name or "all") / f"{stem}.png"
                save_image_atomic(pixels, dest)
                target[stain] = str(dest.resolve())
            if label is None:
                report.unlabelled += 1
            report.ab_pairs += 1
            out.append((_split_of(split_name, name), {**target, LABEL_KEY: label, "id": stem}))
    return out


def split_validation(
    records: list[dict], val_fraction: float, seed: int, split_by: str | SplitBy | None = None
) -> tuple[list[dict], list[dict]]:
    """Carve a validation set from training records, stratified by class and seeded.

    Patch-level (the default): each class gives ``round(n * val_fraction)`` records (at least one when it has two or
    more and the fraction is positive). With ``split_by`` (``id_block:N`` or ``csv:PATH``, see
    :mod:`her2_monai.data.splits`) whole groups of records (slides) move instead, so no group is on both sides.
    Unlabelled records stay in training.

    Args:
        records: training records.
        val_fraction: fraction in ``[0, 1)``.
        seed: random seed.
        split_by: ``None``/``""`` (patch-level), ``"id_block:N"`` or ``"csv:PATH"``.

    Returns:
        ``(training, validation)``.

    Raises:
        ValueError: if ``val_fraction`` is outside ``[0, 1)`` or ``split_by`` is invalid or does not cover the records.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    spec = parse_split_by(split_by)
    if spec.kind != "record":
        return group_split(records, record_groups(records, spec), val_fraction, seed)
    rng = np.random.default_rng(seed)
    by_class: dict[int | None, list[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(record.get(LABEL_KEY), []).append(i)
    val_idx: set[int] = set()
    for label, indices in by_class.items():
        if label is None or val_fraction == 0:
            continue
        n_val = int(round(len(indices) * val_fraction))
        if n_val == 0 and len(indices) >= 2:
            n_val = 1
        val_idx.update(rng.permutation(indices)[:n_val].tolist())
    training = [r for i, r in enumerate(records) if i not in val_idx]
    validation = [r for i, r in enumerate(records) if i in val_idx]
    return training, validation


def scan_dataset(
    dataset_dir: str | os.PathLike,
    pairs_dir: str | os.PathLike | None = None,
    strict: bool = False,
    require_labels: bool = False,
) -> tuple[dict[str, list[dict]], ScanReport]:
    """Scan ``dataset_dir`` into ``{"training", "validation", "test"}`` record lists (no validation carve-out yet).

    Args:
        dataset_dir: dataset root (see module docstring for the layouts).
        pairs_dir: where halves of side-by-side AB images are written (default ``dataset_dir/../<name>_pairs``).
        strict: unpaired files become problems and any problem raises.
        require_labels: files without a HER2 score in their name become problems.

    Returns:
        ``(datalist, report)``.

    Raises:
        FileNotFoundError: if ``dataset_dir`` does not exist or holds none of the accepted layouts.
        DatalistError: in strict mode, when any problem was found.
    """
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir '{root}' does not exist or is not a folder")
    if not any((root / sub).is_dir() for sub in ("HE", "IHC", "AB")):
        raise FileNotFoundError(
            f"dataset_dir '{root}' has none of the folders HE/, IHC/ or AB/; expected the BCI layout "
            "HE/{train,test}/NNNNN_{split}_{score}.png with the same names under IHC/"
        )
    report = ScanReport()
    found = _scan_paired(root, require_labels, strict, report)
    if (root / "AB").is_dir():
        pairs = Path(pairs_dir) if pairs_dir is not None else root.parent / f"{root.name}_pairs"
        found += _scan_ab(root, pairs, require_labels, report)
    datalist: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    seen: dict[tuple[str, str], dict] = {}
    for split, record in found:
        # The same file name in two folders of one split (e.g. HE/x.png and HE/test/x.png) gives two records with
        # one id, which the datalist loader refuses; keep the first and report the other.
        first = seen.setdefault((split, str(record.get("id"))), record)
        if first is not record:
            path = record.get(HE_KEY) or record.get(IHC_KEY) or record.get("image")
            kept = first.get(HE_KEY) or first.get(IHC_KEY) or first.get("image")
            report.problems.append(
                (str(path), f"same id '{record.get('id')}' as {kept} in '{split}'; ids must be unique")
            )
            continue
        datalist[split].append(record)
    if strict and report.problems:
        raise DatalistError(report.problems)
    return datalist, report


def build_datalist(
    dataset_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    require_labels: bool = False,
    pairs_dir: str | os.PathLike | None = None,
    split_by: str | SplitBy | None = None,
) -> tuple[dict[str, list[dict]], ScanReport]:
    """Scan a dataset and carve a stratified validation split from its training records.

    A ``val`` split folder, when the dataset has one, is kept as it is and no records are moved. The report says how
    validation was drawn (``split_info``) and names classes the split left empty on one side (``split_warnings``).

    Args:
        dataset_dir, strict, require_labels, pairs_dir: as in :func:`scan_dataset`.
        val_fraction: fraction of each class of the training records moved to validation.
        seed: seed of the stratified draw.
        split_by: ``None``/``""`` (patch-level), ``"id_block:N"`` or ``"csv:PATH"`` (see :func:`split_validation`).

    Returns:
        ``(datalist, report)``.
    """
    spec = parse_split_by(split_by)
    datalist, report = scan_dataset(dataset_dir, pairs_dir=pairs_dir, strict=strict, require_labels=require_labels)
    if not datalist["validation"]:
        pool = datalist["training"]
        groups = record_groups(pool, spec)
        datalist["training"], datalist["validation"] = split_validation(pool, val_fraction, seed, spec)
        if any(r.get(LABEL_KEY) is not None for r in pool):
            labelled = {g for g, r in zip(groups, pool) if r.get(LABEL_KEY) is not None}
            in_val = {id(r) for r in datalist["validation"]}
            val_groups = {g for g, r in zip(groups, pool) if id(r) in in_val}
            report.split_info = describe_split(spec, len(labelled), len(val_groups))
    report.split_warnings = split_coverage(datalist["training"], datalist["validation"])
    if not any(datalist.values()):
        raise DatalistError(report.problems or [(str(dataset_dir), "no images found")])
    return datalist, report


def write_datalist(datalist: dict[str, list[dict]], output: str | os.PathLike) -> Path:
    """Write the datalist JSON atomically (a reader never sees a half-written file).

    Returns:
        The output path.
    """
    return write_json_atomic(datalist, output)


def read_datalist_json(path: str | os.PathLike) -> object:
    """Parse a datalist file, with errors that name the file.

    Args:
        path: JSON file.

    Returns:
        The parsed content (a dict of splits, or a list of records for inference inputs).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist '{path}' not found; create it with `python -m her2_monai datalist`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist '{path}' is not valid JSON: {err}") from None


def select_records(records: list[dict], require_label: bool = False, require_both: bool = False) -> list[dict]:
    """The records a stage uses: labelled ones (classifier) and/or those with both stains (stain translation).

    Args:
        records: datalist records.
        require_label: drop records whose ``label`` is null.
        require_both: drop records missing a stain.

    Returns:
        The kept records, in order.
    """
    if require_label:
        records = [r for r in records if r.get(LABEL_KEY) is not None]
    if require_both:
        records = [r for r in records if r.get(HE_KEY) and r.get(IHC_KEY)]
    return list(records)


def load_datalist_split(
    path: str | os.PathLike, split: str, require_label: bool = False, require_both: bool = False
) -> list[dict]:
    """Read one split of a datalist JSON, optionally keeping only labelled and/or dual-stain records.

    Args:
        path: datalist JSON (as written by :func:`write_datalist`).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        require_label: drop records whose ``label`` is null (classifier stages).
        require_both: drop records missing a stain (stain-translation stage).

    Returns:
        The records.

    Raises:
        FileNotFoundError: if the file does not exist.
        KeyError: if the split is not in the file.
        DatalistError: if records are malformed or name image files that do not exist, every one listed (see
            :func:`her2_monai.data.validate.check_records`).
        ValueError: if the file is not a datalist or no record is left.
    """
    path = Path(path)
    content = read_datalist_json(path)
    if not isinstance(content, dict) or split not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise KeyError(f"datalist '{path}' has no '{split}' list (found {found})")
    records = check_records(content[split], f"{path} ['{split}']", base_dir=path.parent, require_files=True)
    records = select_records(records, require_label=require_label, require_both=require_both)
    if not records:
        wanted = " labelled" * require_label + " dual-stain" * require_both
        raise ValueError(f"datalist '{path}' has no{wanted} records in '{split}'")
    return records


def class_weights(records: list[dict], num_classes: int = len(CLASS_NAMES)) -> list[float]:
    """Inverse-frequency class weights normalised to mean 1 (classes absent from ``records`` get weight 1).

    Returns:
        One weight per class, for ``torch.nn.CrossEntropyLoss(weight=...)``.
    """
    counts = Counter(int(r[LABEL_KEY]) for r in records if r.get(LABEL_KEY) is not None)
    raw = [1.0 / counts[c] if counts[c] else 0.0 for c in range(num_classes)]
    present = [w for w in raw if w > 0]
    mean = sum(present) / len(present) if present else 1.0
    return [w / mean if w > 0 else 1.0 for w in raw]
