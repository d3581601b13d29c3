"""The NCC similarity / affine registration pieces on synthetic pairs with a known transform (small and fast)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from her2_monai.registration import PairRegistration, RegistrationResult, linear, warp_rgb
from her2_monai.registration.pairwise import _verdict

SIZE = 128


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Blob-like 'tissue architecture' in [0, 1]: smoothed noise."""
    noise = np.random.default_rng(seed).normal(size=(size, size))
    image = ndimage.gaussian_filter(noise, 3.0)
    return (image - image.min()) / np.ptp(image)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float], size: int = SIZE) -> np.ndarray:
    a = math.radians(angle_deg)
    matrix = np.eye(3)
    matrix[:2, :2] = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    center = np.full(2, (size - 1) / 2)
    matrix[:2, 2] = center - matrix[:2, :2] @ center + np.asarray(shift)
    return matrix


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``out(x) = image(matrix @ x)``, white (255) outside, for an RGB image."""
    shape = image.shape[:2]
    return warp_rgb(image, RegistrationResult("affine", matrix, matrix, 1.0, shape, shape, shape))


def test_band_pass_removes_the_mean_and_slow_gradients():
    ramp = np.tile(np.linspace(0.0, 10.0, 96), (96, 1))
    out = linear.band_pass(ramp + 5.0)
    assert out.dtype == np.float32 and np.abs(out[32:-32, 32:-32]).max() < 1e-3
    assert np.abs(linear.band_pass(_texture(0, 64))).max() > 1e-2


def test_search_and_refine_recover_a_known_similarity():
    """moving(x) = fixed(D x): the registration (fixed -> moving coordinates) must be D^-1, scale included."""
    fixed = linear.band_pass(_texture(1))
    known = _similarity(9.0, 1.04, (7.0, -5.0))
    moving = linear.band_pass(ndimage.affine_transform(_texture(1), _swap(known)[:2, :2], _swap(known)[:2, 2]))
    starts = linear.search_similarity(fixed, moving, max_angle=20.0, count=3)
    assert linear.grid_distance(starts[0][1], np.linalg.inv(known), fixed.shape) < 3.0  # the right basin
    matrix, ncc = linear.refine(fixed, moving, starts[0][1], "similarity")
    assert linear.grid_distance(matrix, np.linalg.inv(known), fixed.shape) < 0.5 and ncc > 0.9
    assert linear.masked_ncc(fixed, moving, matrix) == pytest.approx(ncc)
    with pytest.raises(ValueError, match="unknown transform model"):
        linear.refine(fixed, moving, matrix, "projective")


def test_masked_ncc_ignores_the_fill_and_rejects_a_small_overlap():
    fixed = _texture(2)
    assert linear.masked_ncc(fixed, fixed, np.eye(3)) == pytest.approx(1.0)
    far = _similarity(0.0, 1.0, (100.0, 100.0))
    assert linear.masked_ncc(fixed, fixed, far) == -1.0


def _swap(matrix: np.ndarray) -> np.ndarray:
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    return swap @ matrix @ swap


def _stained_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 'H&E' (purple) and 'IHC' (brown on pale blue) of the same architecture."""
    tissue = _texture(seed)[..., None]
    he = 255 - tissue * np.array([90.0, 160.0, 60.0])
    ihc = 250 - tissue * np.array([60.0, 110.0, 150.0])
    return he.astype(np.uint8), ihc.astype(np.uint8)


def test_pair_registration_recovers_scale_and_rotation_across_stains():
    he, ihc = _stained_pair(3)
    known = _similarity(-11.0, 0.96, (-6.0, 8.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = PairRegistration(transform="similarity", max_side=SIZE)(he, _warp(ihc, known))
    assert linear.grid_distance(known @ result.matrix, np.eye(3), he.shape) < 1.0
    assert result.status == "registered" and result.details["parameters"]["method"] == "ncc"
    measures = result.details["verdict_measures"]
    assert {"ncc", "margin", "support", "tissue_dice", "ncc_identity"} <= set(measures)
    assert measures["ncc"] > measures["ncc_identity"]


def test_verdict_rules_flag_an_inconsistent_or_unmeasured_registration():
    assert _verdict({"inverse_consistency_px": 0.2}, "registered") == ("registered", [])
    verdict, reasons = _verdict({"inverse_consistency_px": 9.0}, "registered")
    assert verdict == "uncertain" and reasons[0].startswith("inverse_consistency_px 9.000 >")
    assert _verdict({}, "registered") == ("uncertain", ["inverse_consistency_px not measured"])
    assert _verdict({"inverse_consistency_px": 0.2}, "identity")[0] == "failed"
    assert _verdict({"support": 0.25}, "registered", "itk")[0] == "uncertain"


def test_unrelated_tissue_is_not_trusted():
    """A forced failure: the 'IHC' shows other tissue, so the two directions of registration do not agree."""
    he, _ = _stained_pair(5)
    _, other = _stained_pair(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PairRegistration(max_side=SIZE)(he, other)
    assert result.verdict in ("uncertain", "failed") and result.verdict_reasons, result.details["verdict_measures"]
