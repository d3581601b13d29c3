"""The tissue check that runs before any HER2 score: blank, transparent, greyscale and tiny images are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from her2_monai.data.image_reader import read_rgb
from her2_monai.transforms import TissueCheckd, tissue_fraction
from her2_monai.transforms.tissue import bounded_otsu


def _tissue_like(size: int = 128, seed: int = 0) -> np.ndarray:
    """Pink/purple blobs on white: an H&E-like patch, about half tissue."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 245.0)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(12):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 8, size // 4))]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[blob] = [200, 110, 170] + rng.normal(0, 8, (int(blob.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _check(image: np.ndarray, **kwargs) -> dict:
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    return TissueCheckd(**kwargs)({"he": tensor, "id": "x"})


def test_tissue_passes_and_blank_images_are_refused() -> None:
    ok = _check(_tissue_like())
    assert ok["tissue_ok"] == 1.0 and ok["tissue_issue"] == ""
    assert 0.2 < float(ok["tissue_fraction"][0]) < 0.9 and float(ok["tissue_fraction"][1]) == -1.0  # no IHC given
    rng = np.random.default_rng(0)
    glass = np.clip(np.array([240, 236, 228]) + rng.normal(0, 3, (256, 256, 3)), 0, 255).astype(np.uint8)
    white = _check(np.full((256, 256, 3), 255, np.uint8))
    assert white["tissue_ok"] == 0.0 and "he: blank image" in white["tissue_issue"]
    out = _check(glass)
    assert out["tissue_ok"] == 0.0 and "he: no stained tissue: 0.0% of the pixels" in out["tissue_issue"]
    grey = np.repeat(_tissue_like().mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    assert "greyscale" in _check(grey)["tissue_issue"]
    tiny = _check(np.full((1, 1, 3), [200, 100, 150], np.uint8))
    assert tiny["tissue_ok"] == 0.0 and "1x1 px, smaller than the 32 px minimum" in tiny["tissue_issue"]
    with pytest.raises(ValueError, match="min_size"):
        TissueCheckd(min_size=0)


def test_real_patches_have_tissue(shared_data) -> None:
    files = sorted((shared_data / "bci").rglob("*.png")) + sorted((shared_data / "mist").rglob("*.jpg"))
    assert files
    for path in files:
        assert tissue_fraction(read_rgb(path)) > 0.05, path  # measured minimum 0.067 (a BCI IHC patch)


def test_bounded_otsu_splits_a_bimodal_map_and_keeps_to_its_bounds() -> None:
    glass_and_tissue = np.concatenate([np.full(500, 0.02), np.full(500, 0.30)])
    level = bounded_otsu(glass_and_tissue, 0.0, 1.0, flat=0.5)
    assert 0.02 <= level < 0.30
    all_tissue = np.concatenate([np.full(500, 0.5), np.full(500, 0.9)])  # Otsu would split the tissue itself
    assert bounded_otsu(all_tissue, 0.06, 0.08, flat=0.5) == 0.08
    all_glass = np.concatenate([np.full(500, 0.01), np.full(500, 0.03)])  # Otsu would split glass noise
    assert bounded_otsu(all_glass, 0.06, 0.08, flat=0.5) == 0.06
    assert bounded_otsu(np.full(10, 0.3), 0.06, 0.08, flat=0.06) == 0.06  # flat: Otsu is undefined
    assert bounded_otsu(np.array([0.3, 0.3 + 1e-7]), 0.06, 0.08, flat=0.07, min_spread=1e-6) == 0.07
