"""Property-based fuzzing (Hypothesis) of the image readers, the datalist scanner and loader, and the transforms.

Whatever the input -- random bytes, real files cut short or with flipped bytes, random shapes and dtypes, random
folder trees and datalist JSON -- the result is either valid (RGB uint8 pixels, records that point at files, finite
tensors) or the project's own error with a message (``ImageReadError``, ``DatalistError``, a ``ValueError`` naming
the problem), never another exception, a hang or NaN.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default: derandomized, fixed examples, a deadline) and ``big`` (a large
budget, for an occasional long run: ``HYPOTHESIS_PROFILE=big python -m pytest tests/test_fuzz.py
--hypothesis-show-statistics``).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, bundle_component
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from her2_monai.data.datalist import DatalistError, build_datalist, load_datalist_split, scan_dataset
from her2_monai.data.image_reader import ImageReadError, probe_image, read_rgb
from her2_monai.inference import collect_records
from her2_monai.transforms import FillMissingStainsd, LoadStainsd, RandModalityDropoutd, RandStainJitterd

_COMMON = {"suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
settings.register_profile(
    "ci", max_examples=25, derandomize=True, database=None, deadline=timedelta(seconds=20), print_blob=True, **_COMMON
)
settings.register_profile("big", max_examples=1500, deadline=timedelta(seconds=60), print_blob=True, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
#: Seconds a whole fuzz test may take before pytest-timeout calls it a hang.
TIMEOUT_S = 1800 if os.environ.get("HYPOTHESIS_PROFILE") == "big" else 240

pytestmark = pytest.mark.timeout(TIMEOUT_S)


def _join(parts: tuple[bytes, bytes]) -> bytes:
    return parts[0] + parts[1]


_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"GIF89a", b"BM", b"RIFF"]


def _real_files() -> list[Path]:
    if not SHARED_DATA.is_dir():
        return []
    files = sorted(SHARED_DATA.glob("bci/*/test/*.png"))[:2] + sorted(SHARED_DATA.glob("mist/*/*.jpg"))[:1]
    return files + sorted(SHARED_DATA.glob("stain_reference/*.png"))


def _read_checked(path: Path) -> None:
    """Both readers agree: the same valid image, or an ImageReadError naming the file."""
    try:
        size = probe_image(path)
    except ImageReadError as err:
        assert err.path == str(path) and err.reason
        size = None
    try:
        rgb = read_rgb(path)
    except ImageReadError as err:
        assert err.path == str(path) and err.reason
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.size > 0
    if size is not None:
        assert size == (rgb.shape[1], rgb.shape[0])


# ------------------------------------------------------------------------------------------- image readers
@PROFILE
@given(
    data=st.one_of(st.binary(max_size=2048), st.tuples(st.sampled_from(_MAGIC), st.binary(max_size=2048)).map(b"".join))
)
def test_random_bytes_give_an_image_or_an_image_read_error(tmp_path, data):
    _read_checked(_write(tmp_path, "random.png", data))


@PROFILE
@given(
    index=st.integers(0, 7),
    fraction=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6),
)
def test_real_files_cut_short_or_damaged_give_an_image_or_an_image_read_error(tmp_path, index, fraction, flips):
    files = _real_files()
    if not files:
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA}")
    data = bytearray(files[index % len(files)].read_bytes())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    _read_checked(_write(tmp_path, "real.png", bytes(data[: max(1, int(len(data) * fraction))])))


_MODES = {
    "RGB": (np.uint8, 3),
    "RGBA": (np.uint8, 4),
    "L": (np.uint8, None),
    "I;16": (np.uint16, None),
    "I": (np.int32, None),
    "F": (np.float32, None),
}


@PROFILE
@given(
    mode=st.sampled_from(sorted(_MODES)),
    fmt=st.sampled_from(["PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP"]),
    shape=array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
    seed=st.integers(0, 2**16),
    special=st.sampled_from([None, "nan", "inf", "extreme"]),
)
def test_random_shapes_modes_and_formats_are_read_as_rgb(tmp_path, mode, fmt, shape, seed, special):
    dtype, channels = _MODES[mode]
    rng = np.random.default_rng(seed)
    full = (*shape, channels) if channels else shape
    if np.issubdtype(dtype, np.floating):
        pixels = rng.normal(0.5, 1.0, full).astype(dtype)
        if special:
            pixels.flat[rng.integers(0, pixels.size)] = {"nan": np.nan, "inf": np.inf, "extreme": -1e30}[special]
    else:
        info = np.iinfo(dtype)
        pixels = rng.integers(info.min, info.max, full, endpoint=True, dtype=np.int64).astype(dtype)
    image = Image.fromarray(pixels)
    assert image.mode == mode
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # PIL cannot write this mode in this format: nothing to read
    path = _write(tmp_path, "shaped.img", buffer.getvalue())
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (*shape, 3)
    assert probe_image(path) == (shape[1], shape[0])


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------- datalist scanner
def _png(seed: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _ab(seed: int) -> bytes:
    """A side-by-side pair image (2H x H), or one pixel too wide for every third seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (12, 24 if seed % 3 else 25, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


_NAME = st.one_of(
    st.builds(
        lambda i, split, score: f"{i:05d}_{split}_{score}",
        st.integers(0, 30),
        st.sampled_from(["train", "test", "val", "trian"]),
        st.sampled_from(["0", "1+", "2+", "3+", "4+", "x", ""]),
    ),
    st.text(st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="/\\\0"), min_size=1, max_size=12),
)
_CONTENT = st.one_of(
    st.builds(_png, st.integers(0, 99), st.sampled_from([8, 16])),
    st.builds(lambda s, k: _png(s, 16)[:k], st.integers(0, 99), st.integers(0, 200)),
    st.binary(max_size=64),
    st.builds(_ab, st.integers(0, 99)),
)


_ENTRY = st.tuples(
    st.sampled_from(["HE", "IHC", "AB"]),
    st.sampled_from(["", "train", "test", "val", "other"]),
    _NAME,
    st.sampled_from([".png", ".jpg", ".tif", ".PNG", ".txt"]),
    _CONTENT,
)


@PROFILE
@given(entries=st.lists(_ENTRY, max_size=12), strict=st.booleans(), require_labels=st.booleans())
def test_random_dataset_folders_scan_to_valid_records_or_a_datalist_error(entries, strict, require_labels):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "dataset"
        for stain, split, name, suffix, content in entries:
            target = root / stain / split / f"{name}{suffix}"
            if name in (".", "..") or target.parent.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.is_dir():
                target.write_bytes(content)
        try:
            datalist, report = build_datalist(root, 0.25, 0, strict, require_labels, pairs_dir=Path(folder) / "pairs")
        except DatalistError as err:
            assert err.problems and all(isinstance(reason, str) and reason for _, reason in err.problems)
            return
        except FileNotFoundError as err:
            assert str(root) in str(err) or "dataset_dir" in str(err)
            return
        assert not (strict and report.problems)
        for split, records in datalist.items():
            assert split in ("training", "validation", "test")
            for record in records:
                assert record.get("he") or record.get("ihc")
                assert record["label"] is None or record["label"] in (0, 1, 2, 3)
                assert all(Path(record[k]).is_file() for k in ("he", "ihc") if record.get(k))
        # what the scanner wrote loads back through the checked loader
        path = Path(folder) / "datalist.json"
        path.write_text(json.dumps(datalist))
        for split, records in datalist.items():
            if records:
                assert len(load_datalist_split(path, split)) == len(records)
        scan_dataset(root, pairs_dir=Path(folder) / "pairs2")  # the plain scan agrees that it is scannable


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(
        ["he", "ihc", "image", "label", "id", "training", "validation", "test", "x"]), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@PROFILE
@given(content=_JSON, split=st.sampled_from(["training", "validation", "test", "all"]))
def test_random_datalist_json_gives_records_or_a_named_error(tmp_path, content, split):
    path = _write(tmp_path, "datalist.json", json.dumps(content).encode())
    for load in (lambda: load_datalist_split(path, "training" if split == "all" else split),
                 lambda: collect_records(datalist=path, split=split)):  # fmt: skip
        try:
            records = load()
        except (DatalistError, ValueError, KeyError) as err:
            assert str(path) in str(err) or isinstance(err, DatalistError), err
            continue
        assert records and all(isinstance(r, dict) for r in records)
        assert all(isinstance(r[k], str) for r in records for k in ("he", "ihc", "image") if r.get(k) is not None)


# ----------------------------------------------------------------------------------------------- transforms
_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, bool])


@PROFILE
@given(
    he=st.one_of(st.none(), arrays(_DTYPES, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=12))),
    ihc=st.one_of(st.none(), arrays(_DTYPES, array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12))),
    label=st.one_of(st.none(), st.integers(0, 3)),
    seed=st.integers(0, 2**16),
)
def test_stain_transforms_give_finite_tensors_or_a_value_error(he, ihc, label, seed):
    chain = [
        LoadStainsd(),
        RandModalityDropoutd(prob=0.5),
        RandStainJitterd(prob=1.0),
        FillMissingStainsd(),
    ]
    for transform in chain[1:3]:
        transform.set_random_state(seed=seed)
    item = {"he": he, "ihc": ihc, "label": label}
    try:
        for transform in chain:
            item = transform(item)
    except ValueError as err:
        assert str(err)
        return
    assert item["he"].shape == item["ihc"].shape and item["he"].shape[0] == 3
    assert torch.isfinite(item["he"]).all() and torch.isfinite(item["ihc"]).all()
    assert item["mask"].tolist() in ([1.0, 1.0], [1.0, 0.0], [0.0, 1.0])


@pytest.fixture(scope="module")
def bundle_chain():
    return bundle_component("train.json", "stain_preprocessing", image_size=16)


@PROFILE
@given(
    size=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    colour=st.one_of(st.sampled_from([(255, 255, 255), (0, 0, 0)]), st.tuples(*[st.integers(0, 255)] * 3)),
    noise=st.floats(0.0, 80.0),
    seed=st.integers(0, 2**16),
)
def test_the_bundle_preprocessing_of_any_patch_is_finite_and_in_range(
    tmp_path, bundle_chain, size, colour, noise, seed
):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour, float) + rng.normal(0, noise, (*size, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "patch.png"
    Image.fromarray(pixels).save(path)
    item = bundle_chain({"he": str(path), "ihc": None, "label": 1})
    for key in ("he", "ihc"):
        tensor = item[key].as_tensor() if hasattr(item[key], "as_tensor") else item[key]
        assert tuple(tensor.shape) == (3, 16, 16) and torch.isfinite(tensor).all()
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert not math.isnan(float(item["mask"].sum()))


def test_one_file_name_in_two_folders_of_a_split_is_kept_once_and_reported(tmp_path):
    """Found by the large-budget run: ``HE/x.png`` and ``HE/test/x.png`` gave two records with one id, so the scanner
    wrote a datalist that the checked loader then refused."""
    for folder in ("HE", "HE/test"):  # H&E only, as in the failing case: unpaired records are kept (non-strict)
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 120, 160)).save(tmp_path / folder / "00000_test_1+.png")
    datalist, report = build_datalist(tmp_path, 0.25, 0, pairs_dir=tmp_path / "pairs")
    assert [r["id"] for r in datalist["test"]] == ["00000_test_1+"]
    assert any("ids must be unique" in reason for _, reason in report.problems)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    assert len(load_datalist_split(path, "test")) == 1
