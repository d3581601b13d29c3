"""Stain normalisation transforms on the real BCI / MIST patches (downscaled to 192 px for speed)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from her2_monai.transforms.stain_normalization import (
    METHODS,
    NormalizeStain,
    NormalizeStaind,
    StainNormalizationWarning,
    StainReference,
    channel_histograms,
    macenko_stain_matrix,
    reinhard_statistics,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET = SHARED_DATA / "stain_reference" / "he_target_tiatoolbox.png"
SIZE = 192


def _load(path: Path, size: int = SIZE) -> np.ndarray:
    """A real patch as a ``(3, size, size)`` float32 array in [0, 255] (the project's loaded-image layout)."""
    from her2_monai.data.image_reader import read_rgb

    image = Image.fromarray(read_rgb(path)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()


def _hwc(image) -> np.ndarray:
    return np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)


@pytest.fixture(scope="module")
def data() -> Path:
    if not (SHARED_DATA / "bci").is_dir() or not TARGET.is_file():
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA} (they sit beside the repository in CI)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def he_images(data) -> list[np.ndarray]:
    files = sorted((data / "bci" / "HE" / "test").glob("*.png")) + sorted((data / "mist" / "HE").glob("*.jpg"))
    return [_load(f) for f in files]


@pytest.fixture(scope="module")
def ihc_images(data) -> dict[str, np.ndarray]:
    files = sorted((data / "bci" / "IHC" / "test").glob("*.png")) + sorted((data / "mist" / "IHC").glob("*.jpg"))
    return {f.name: _load(f) for f in files}


@pytest.fixture(scope="module")
def he_references(data) -> dict[str, StainReference]:
    target = _load(TARGET, 400)
    return {method: StainReference.fit([target], method=method, stain="he") for method in METHODS}


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Mean angle in degrees between matching rows of two stain matrices."""
    return float(np.degrees(np.arccos(np.clip((a * b).sum(axis=1), -1, 1))).mean())


def _histogram_distance(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean over channels of the L1 distance between normalised cumulative histograms (0 = identical)."""
    cdf = np.cumsum(channel_histograms(image), axis=1) / (image.shape[0] * image.shape[1])
    ref = np.cumsum(reference, axis=1) / reference.sum(axis=1, keepdims=True)
    return float(np.abs(cdf - ref).sum(axis=1).mean())


@pytest.mark.parametrize("method", METHODS)
def test_output_contract_on_real_he(he_images, he_references, method):
    normalize = NormalizeStain(he_references[method])
    for image in he_images[:3]:
        out_np = normalize(image)
        assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == image.shape
        assert np.isfinite(out_np).all() and out_np.min() >= 0 and out_np.max() <= 255
        out_t = normalize(torch.from_numpy(image))
        assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
        np.testing.assert_allclose(out_t.numpy(), out_np, atol=1e-3)
    uint8 = normalize(he_images[0].astype(np.uint8))
    assert uint8.dtype == np.uint8 and uint8.shape == he_images[0].shape


def test_reinhard_moves_lab_statistics_to_reference(he_images, he_references):
    ref = he_references["reinhard"].statistics
    mean_ref, std_ref = np.asarray(ref["lab_mean"]), np.asarray(ref["lab_std"])
    normalize = NormalizeStain(he_references["reinhard"])
    for image in he_images:
        mean_in, std_in = reinhard_statistics(_hwc(image))
        mean_out, std_out = reinhard_statistics(_hwc(normalize(image)))
        # Measured on the 10 real H&E patches: mean distance 12-34 -> <= 1.1, std distance 4-14 -> <= 2.6 (gamut clip).
        assert np.linalg.norm(mean_out - mean_ref) < 0.2 * np.linalg.norm(mean_in - mean_ref)
        assert np.linalg.norm(std_out - std_ref) < 0.5 * np.linalg.norm(std_in - std_ref)


def test_macenko_moves_stain_vectors_to_reference(he_images, he_references):
    for method in ("macenko", "multitarget"):
        ref_vectors = np.asarray(he_references[method].statistics["stain_vectors"])
        normalize = NormalizeStain(he_references[method])
        before, after = [], []
        for image in he_images:
            before.append(_angle(macenko_stain_matrix(_hwc(image))[0], ref_vectors))
            after.append(_angle(macenko_stain_matrix(_hwc(normalize(image)))[0], ref_vectors))
        # Measured: mean angle to the reference vectors 8.3 -> 2.1 degrees; only the faint grey BCI 00011 stays.
        assert np.mean(after) < 0.5 * np.mean(before), (before, after)
        assert sum(a < b for a, b in zip(after, before)) >= len(before) - 1, (before, after)


def test_histogram_matching_reduces_histogram_distance(he_images, he_references):
    reference = np.asarray(he_references["histogram"].statistics["histograms"])
    normalize = NormalizeStain(he_references["histogram"])
    for image in he_images:
        before = _histogram_distance(_hwc(image), reference)
        after = _histogram_distance(_hwc(normalize(image)), reference)
        assert after < 0.25 * before, (before, after)  # measured ratio <= 0.20, mean 0.05


def test_ihc_macenko_keeps_dab_amount(ihc_images):
    """An IHC reference from 3+ patches must not make a HER2-0 patch look strongly DAB-stained."""
    strong = [ihc_images["00011_test_3+.png"], ihc_images["00052_test_3+.png"]]
    reference = StainReference.fit(strong, method="multitarget", stain="ihc")
    assert reference.stain == "ihc" and len(reference.statistics["per_image"]) == 2
    faint = ihc_images["00118_test_0.png"]
    keep = NormalizeStain(reference)(faint)
    rescale = NormalizeStain(reference, preserve_dab=False)(faint)
    ref_vectors = np.asarray(reference.statistics["stain_vectors"])

    def dab_od(image):
        od = -np.log((_hwc(image).reshape(-1, 3) + 1) / 256)
        return float(np.linalg.lstsq(ref_vectors.T, od.T, rcond=None)[0][1].mean())

    assert np.isfinite(keep).all() and 0 <= keep.min() and keep.max() <= 255
    assert dab_od(keep) <= dab_od(rescale)
    assert abs(dab_od(keep) - dab_od(faint)) < 0.05


@pytest.mark.parametrize(
    "name, image",
    [
        ("white", np.full((3, 64, 64), 255.0, np.float32)),
        ("black", np.zeros((3, 64, 64), np.float32)),
        ("single colour", np.stack([np.full((64, 64), v, np.float32) for v in (200.0, 120.0, 180.0)])),
        ("near white noise", np.clip(250 + np.random.default_rng(0).normal(0, 3, (3, 64, 64)), 0, 255)),
        ("tiny 8x8", np.random.default_rng(1).uniform(50, 250, (3, 8, 8)).astype(np.float32)),
    ],
)
def test_degenerate_inputs_pass_through_with_warning(he_references, name, image):
    for method, reference in he_references.items():
        with pytest.warns(StainNormalizationWarning, match="unchanged"):
            out = NormalizeStain(reference)(image)
        assert out is image, f"{name} / {method}"
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        with pytest.warns(StainNormalizationWarning):
            assert torch.equal(NormalizeStain(reference)(tensor), tensor)


def test_reference_round_trip_gives_identical_outputs(he_images, he_references, tmp_path):
    for method, reference in he_references.items():
        path = reference.save(tmp_path / f"{method}.json")
        document = json.loads(path.read_text())
        assert document["method"] == method and document["stain"] == "he" and document["version"] == 1
        loaded = StainReference.load(path)
        a, b = NormalizeStain(reference)(he_images[4]), NormalizeStain(str(path))(he_images[4])
        np.testing.assert_array_equal(a, b)
        assert NormalizeStain(loaded, method=method, stain="he").method == method
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"
    assert path.stat().st_mode & 0o044, "a saved reference is readable by others (umask permitting)"


def test_fit_on_the_fly_from_image_path(data, he_images, he_references):
    out = NormalizeStain(str(TARGET), method="reinhard", stain="he")(he_images[0])
    reference = NormalizeStain(he_references["reinhard"])(he_images[0])
    assert np.abs(out - reference).mean() < 2.0  # 1000 px vs 400 px fit of the same target


def test_bad_reference_and_options_give_clear_errors(he_references, tmp_path):
    with pytest.raises(ValueError, match="unknown stain normalisation method 'vahadane'"):
        NormalizeStain(str(TARGET), method="vahadane")
    with pytest.raises(ValueError, match="unknown stain 'pas'"):
        StainReference.fit([np.zeros((3, 32, 32))], method="reinhard", stain="pas")
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=r"missing\.json: file not found"):
        NormalizeStain(str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a JSON file"):
        StainReference.load(broken)
    document = he_references["macenko"].to_dict()
    del document["statistics"]["max_concentrations"]
    (tmp_path / "incomplete.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"incomplete\.json: missing key 'statistics\.max_concentrations'"):
        StainReference.load(tmp_path / "incomplete.json")
    (tmp_path / "other.json").write_text(json.dumps({**he_references["reinhard"].to_dict(), "method": "magic"}))
    with pytest.raises(ValueError, match=r"other\.json: 'method': unknown stain normalisation method 'magic'"):
        StainReference.load(tmp_path / "other.json")
    path = he_references["reinhard"].save(tmp_path / "reinhard.json")
    with pytest.raises(ValueError, match="method 'macenko' was asked for, but stain reference .*reinhard.json is for"):
        NormalizeStain(str(path), method="macenko")
    with pytest.raises(ValueError, match="reference image <array 0>: the image is one flat colour"):
        StainReference.fit([np.full((3, 32, 32), 255.0)], method="macenko")
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        NormalizeStain(he_references["reinhard"])(np.zeros((64, 64, 3)))


def test_dictionary_transform_with_missing_key(he_images, ihc_images, he_references):
    transform = NormalizeStaind(keys=("he", "ihc"), reference=he_references["reinhard"])
    record = {"he": torch.from_numpy(he_images[0]), "label": 2}
    out = transform(record)
    assert set(out) == {"he", "label"} and out["label"] == 2
    assert out["he"].shape == (3, SIZE, SIZE) and not torch.equal(out["he"], record["he"])
    assert transform({"he": None, "label": 0})["he"] is None
    strict = NormalizeStaind(keys="ihc", reference=he_references["reinhard"], allow_missing_keys=False)
    with pytest.raises(KeyError):
        strict(record)


def test_stain_reference_command(data, tmp_path, capsys):
    from her2_monai.cli import main
    from her2_monai.stain_cli import stain_reference

    files = sorted((data / "mist" / "HE").glob("*.jpg"))[:2]
    output = tmp_path / "ref.json"
    argv = ["stain-reference", "--images", str(TARGET), *map(str, files), "--method", "multitarget"]
    assert main([*argv, "--stain", "he", "--output", str(output)]) == 0
    reference = StainReference.load(output)
    assert reference.method == "multitarget" and len(reference.images) == 3
    assert "multitarget he reference fitted on 3 image(s)" in capsys.readouterr().out
    assert main(["stain-reference", "--images", str(tmp_path / "nope.png"), "--output", str(output)]) == 2
    assert "nope.png: file not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--output FILE.json is required"):
        stain_reference(str(TARGET))


def test_no_warning_on_real_tissue(he_images, he_references):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StainNormalizationWarning)
        for method in METHODS:
            NormalizeStain(he_references[method])(he_images[1])
