from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from her2_monai.data.datalist import build_datalist
from her2_monai.data.demo import DemoPairGenerator, ensure_demo_dataset, generate_demo_dataset


def test_render_is_deterministic_and_seed_dependent():
    gen = DemoPairGenerator(64)
    he1, ihc1 = gen.render(2, seed=5)
    he2, ihc2 = DemoPairGenerator(64).render(2, seed=5)
    assert np.array_equal(he1, he2) and np.array_equal(ihc1, ihc2)
    he3, _ = gen.render(2, seed=6)
    assert not np.array_equal(he1, he3)
    assert he1.shape == (64, 64, 3) and he1.dtype == np.uint8


def _dab_membrane_signal(ihc: np.ndarray) -> float:
    dab = rgb2hed(ihc)[..., 2]
    return float(np.quantile(dab, 0.99))


def test_ihc_dab_follows_the_score_and_he_has_no_dab_signal():
    gen = DemoPairGenerator(128)
    signal = [np.mean([_dab_membrane_signal(gen.render(label, seed=s)[1]) for s in range(6)]) for label in range(4)]
    assert signal[0] < signal[1] < signal[2] < signal[3], signal


def test_labs_shift_stain_colour():
    he_a, _ = DemoPairGenerator(64, "A").render(1, seed=0)
    he_b, _ = DemoPairGenerator(64, "B").render(1, seed=0)
    assert np.abs(he_a.astype(float).mean((0, 1)) - he_b.astype(float).mean((0, 1))).max() > 5
    with pytest.raises(ValueError, match="unknown lab"):
        DemoPairGenerator(64, "Z")


def test_dataset_is_bci_layout_class_balanced_and_reproducible(tmp_path):
    counts = generate_demo_dataset(tmp_path / "a", n_per_class=3, image_size=32, n_test_per_class=2, seed=1)
    assert counts == {
        "train": dict.fromkeys(("0", "1+", "2+", "3+"), 3),
        "test": dict.fromkeys(("0", "1+", "2+", "3+"), 2),
    }
    datalist, report = build_datalist(tmp_path / "a", val_fraction=0.0, strict=True, require_labels=True)
    assert [r["label"] for r in datalist["training"]].count(2) == 3 and len(datalist["test"]) == 8
    generate_demo_dataset(tmp_path / "b", n_per_class=3, image_size=32, n_test_per_class=2, seed=1)
    for path in sorted((tmp_path / "a").rglob("*.png")):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))
    with pytest.raises(FileExistsError):
        generate_demo_dataset(tmp_path / "a", n_per_class=1, image_size=32)


def test_cache_is_reused_and_never_half_written(tmp_path):
    first = ensure_demo_dataset(tmp_path, n_per_class=1, image_size=32, n_test_per_class=1)
    stamp = (first / "demo.json").stat().st_mtime_ns
    assert ensure_demo_dataset(tmp_path, n_per_class=1, image_size=32, n_test_per_class=1) == first
    assert (first / "demo.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folders left behind


def test_cli_writes_dataset_and_preview(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "her2_monai",
            "demo-data",
            "--output",
            str(tmp_path / "d"),
            "--n_per_class",
            "1",
            "--image_size",
            "32",
            "--preview",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "train 0:1 1+:1 2+:1 3+:1" in out.stdout
    assert Image.open(tmp_path / "p.png").size == (4 * 32, 4 * 32)
    again = subprocess.run(
        [sys.executable, "-m", "her2_monai", "demo-data", "--output", str(tmp_path / "d")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
