"""What to predict: records from a datalist, a BCI-layout folder or a plain folder of images, and their transforms.

An inference record has ``he`` and/or ``ihc`` (declared stains), or ``image`` (one image whose stain is unknown: the
branch selector decides), plus an ``id`` that names its prediction file and an optional ``label``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

from monai.transforms import MapTransform

from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, STAIN_KNOWN_KEY
from her2_monai.data.datalist import IMAGE_SUFFIXES, DatalistError, read_datalist_json, scan_dataset
from her2_monai.data.image_reader import probe_image
from her2_monai.data.validate import check_record_id, check_records

__all__ = [
    "IMAGE_KEY",
    "SOURCE_KEYS",
    "AssignUnknownStaind",
    "collect_records",
    "require_records",
    "check_record_files",
]

#: Record key of an image whose stain is unknown.
IMAGE_KEY = "image"
#: Batch keys keeping the input paths (``""`` when absent) for the prediction files.
SOURCE_KEYS: dict[str, str] = {HE_KEY: "he_path", IHC_KEY: "ihc_path", IMAGE_KEY: "image_path"}
_SPLITS = ("training", "validation", "test")
#: The fix named when a datalist's images lie outside its folder.
OUTSIDE_ROOT_FIX = "write the datalist in the folder that holds its images (relative paths are read from there)"


class AssignUnknownStaind(MapTransform):
    """Put an unknown-stain ``image`` into the H&E slot and flag it, so the predictor lets the selector decide.

    Also copies every input path into ``he_path`` / ``ihc_path`` / ``image_path`` (``""`` when absent; strings collate
    into lists, ``None`` would not) and gives every record a ``label`` key (``None`` -> ``-1`` after loading), so
    records with and without labels can share a batch.

    Args:
        image_key: key of the unknown-stain image.
        stain_known_key: output flag (1.0 = stains declared, 0.0 = selector decides).

    Raises:
        ValueError: for a record with ``image`` and also ``he``/``ihc``, or with none of them.
    """

    def __init__(self, image_key: str = IMAGE_KEY, stain_known_key: str = STAIN_KNOWN_KEY) -> None:
        super().__init__([image_key], allow_missing_keys=True)
        self.image_key = image_key
        self.stain_known_key = stain_known_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        name = d.get("id", "<unnamed record>")
        image = d.pop(self.image_key, None)
        declared = [k for k in (HE_KEY, IHC_KEY) if d.get(k) is not None]
        if image is not None and declared:
            raise ValueError(f"record '{name}': give either '{self.image_key}' (stain unknown) or he/ihc, not both")
        if image is None and not declared:
            raise ValueError(f"record '{name}' has none of 'he', 'ihc' or '{self.image_key}'")
        for key, out in SOURCE_KEYS.items():
            value = image if key == self.image_key else d.get(key)
            d[out] = str(value) if isinstance(value, (str, os.PathLike)) else ""
        if image is not None:
            d[HE_KEY], d[IHC_KEY] = image, None
        d[self.stain_known_key] = 0.0 if image is not None else 1.0
        d.setdefault(LABEL_KEY, None)
        return d


def _with_id(record: dict, index: int, used: set[str]) -> dict:
    record = dict(record)
    if not record.get("id"):
        path = record.get(HE_KEY) or record.get(IHC_KEY) or record.get(IMAGE_KEY)
        record["id"] = Path(str(path)).stem if path else ""
    if check_record_id(record["id"]) is not None:  # a file stem that is no usable name (e.g. "..png")
        record["id"] = f"case_{index:05d}"
    base, k = str(record["id"]), 1
    while record["id"] in used:  # two inputs with the same stem must not overwrite each other's prediction file
        k += 1
        record["id"] = f"{base}_{k}"
    used.add(record["id"])
    return record


def _from_datalist(path: Path, split: str, allow_outside_root: bool = False) -> list[dict]:
    content = read_datalist_json(path)
    if isinstance(content, list):
        return _checked(content, str(path), path, allow_outside_root)
    if not isinstance(content, dict):
        raise ValueError(f"datalist '{path}' must be a list of records or a dict of splits")
    if split == "all":
        return [r for s in _SPLITS for r in _checked(content.get(s, []), f"{path} ['{s}']", path, allow_outside_root)]
    if split not in content:
        raise KeyError(f"datalist '{path}' has no '{split}' list (found {sorted(content)}); set datalist_split")
    return _checked(content[split], f"{path} ['{split}']", path, allow_outside_root)


def _checked(records: object, source: str, path: Path, allow_outside_root: bool = False) -> list[dict]:
    """Records checked as :func:`~her2_monai.data.validate.check_records` does (duplicate ids are renamed later):
    every image must exist and, unless allowed, lie in the datalist's folder."""
    try:
        return check_records(
            records,
            source,
            stain_keys=tuple(SOURCE_KEYS),
            unique_ids=False,
            base_dir=path.parent,
            require_files=True,
            root=None if allow_outside_root else path.parent,
        )
    except DatalistError as err:
        if any("outside the dataset folder" in reason for _, reason in err.problems):
            err.problems.append(
                (
                    str(path),
                    f"{OUTSIDE_ROOT_FIX} (or set --datalist_allow_outside_root true to read them where they are)",
                )
            )
            raise DatalistError(err.problems) from None
        raise


def _from_folder(folder: Path, split: str) -> list[dict]:
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir '{folder}' does not exist or is not a folder")
    if any((folder / sub).is_dir() for sub in ("HE", "IHC", "AB")):
        datalist, _ = scan_dataset(folder)
        return [r for s in _SPLITS for r in datalist[s]] if split == "all" else datalist.get(split, [])
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [{IMAGE_KEY: str(p.resolve()), "id": p.stem} for p in files]


_NO_INPUT = (
    "give exactly one input: --datalist FILE.json (records with he/ihc/image keys) or --dataset_dir FOLDER (BCI layout "
    "or a plain folder of images)"
)


def collect_records(
    dataset_dir: str | os.PathLike = "",
    datalist: str | os.PathLike = "",
    split: str = "all",
    allow_empty: bool = False,
    allow_outside_root: bool = False,
) -> list:
    """Gather the cases to predict.

    Exactly one source: ``datalist`` (a JSON list of records, or a decathlon dict whose ``split`` list is used) or
    ``dataset_dir`` (a BCI-layout folder, scanned like training data, paired by name; or a plain folder whose images
    are single patches of unknown stain). Records get a unique ``id`` (their file stem unless given).

    Args:
        dataset_dir: folder of images.
        datalist: datalist JSON path.
        split: ``"training"``, ``"validation"``, ``"test"`` or ``"all"``.
        allow_empty: return ``[]`` when no source is given (the bundle builds its workflow before the inputs are
            set, e.g. for MONAI's property checks); :func:`require_records` then fails at run time.
        allow_outside_root: read a datalist's images wherever they are; by default every image of a datalist must
            lie in the datalist's folder (or below it), so a datalist from elsewhere cannot make the bundle read,
            and write predictions about, files outside the dataset it describes.

    Returns:
        The records.

    Raises:
        ValueError: if both or neither source is given, the split is unknown, or nothing was found.
        FileNotFoundError: if the source does not exist.
        DatalistError: listing every record whose image is missing or, unless allowed, outside the datalist's folder.
    """
    if split not in (*_SPLITS, "all"):
        raise ValueError(f"split must be one of {(*_SPLITS, 'all')}, got '{split}'")
    if allow_empty and not dataset_dir and not datalist:
        return []
    if bool(dataset_dir) == bool(datalist):
        raise ValueError(f"{_NO_INPUT}; got dataset_dir='{dataset_dir}', datalist='{datalist}'")
    source = Path(datalist or dataset_dir).expanduser()
    records = _from_datalist(source, split, allow_outside_root) if datalist else _from_folder(source, split)
    if not records:
        raise ValueError(f"no images to predict in '{source}' (split '{split}')")
    used: set[str] = set()
    return [_with_id(r, i, used) for i, r in enumerate(records)]


def require_records(records: list) -> list:
    """Fail with the usage line when the inference workflow has nothing to predict.

    Returns:
        ``records``.

    Raises:
        ValueError: if ``records`` is empty.
    """
    if not records:
        raise ValueError(_NO_INPUT)
    return records


def check_record_files(record: Mapping) -> None:
    """Fail early, naming the file, if an input of ``record`` is missing or not a readable image.

    Raises:
        her2_monai.data.image_reader.ImageReadError: with the path and the reason.
    """
    for key in (HE_KEY, IHC_KEY, IMAGE_KEY):
        value = record.get(key)
        if isinstance(value, (str, os.PathLike)):
            probe_image(value)
