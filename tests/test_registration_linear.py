"""The NCC similarity / affine registration pieces on synthetic pairs with a known transform (small and fast)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from registration_helpers import similarity, stains
from scipy import ndimage

from her2_monai.registration import PairRegistration, RegistrationResult, linear, warp_rgb
from her2_monai.registration.channels import fill_mask
from her2_monai.registration.pairwise import _verdict

SIZE = 128


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Blob-like 'tissue architecture' in [0, 1]: smoothed noise."""
    noise = np.random.default_rng(seed).normal(size=(size, size))
    image = ndimage.gaussian_filter(noise, 3.0)
    return (image - image.min()) / np.ptp(image)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float], size: int = SIZE) -> np.ndarray:
    return similarity(angle_deg, scale, shift, size)


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
    return stains(_texture(seed))


def test_pair_registration_recovers_scale_and_rotation_acrossstains():
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


def test_verdict_rules_flag_an_inconsistent_weak_or_unmeasured_registration():
    good = {"inverse_consistency_px": 0.2, "fine_ncc": 0.12}
    assert _verdict(good, "registered") == ("registered", [])
    verdict, reasons = _verdict({**good, "inverse_consistency_px": 9.0}, "registered")
    assert verdict == "uncertain" and reasons == ["inverse_consistency_px 9.000 > 0.5"]
    # a best NCC at the finest level no higher than unrelated tissue reaches by chance
    verdict, reasons = _verdict({**good, "fine_ncc": 0.05}, "registered")
    assert verdict == "uncertain" and reasons == ["fine_ncc 0.050 < 0.06"]
    # without a pyramid level, the registration resolution's NCC stands in, with its own threshold
    assert _verdict({"inverse_consistency_px": 0.2, "ncc": 0.2}, "registered") == ("registered", [])
    verdict, reasons = _verdict({"inverse_consistency_px": 0.2, "ncc": 0.08}, "registered")
    assert verdict == "uncertain" and reasons == ["ncc 0.080 < 0.1"]
    assert _verdict({}, "registered") == (
        "uncertain",
        ["inverse_consistency_px not measured", "ncc not measured"],
    )
    assert _verdict(good, "identity")[0] == "failed"
    assert _verdict({"support": 0.25}, "registered", "itk")[0] == "uncertain"


def test_unrelated_tissue_is_not_trusted():
    """A forced failure: the 'IHC' shows other tissue, so the two directions of registration do not agree."""
    he, _ = _stained_pair(5)
    _, other = _stained_pair(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PairRegistration(max_side=SIZE)(he, other)
    assert result.verdict in ("uncertain", "failed") and result.verdict_reasons, result.details["verdict_measures"]


def test_pyramid_sides_and_rescaled_matrices():
    assert linear.pyramid_sides(256, 1024, 1024) == [512, 1024]
    assert linear.pyramid_sides(256, 512, 1024) == [512]
    assert linear.pyramid_sides(256, 4000, 1024) == [512, 1024]
    assert linear.pyramid_sides(256, 300, 1024) == [] and linear.pyramid_sides(256, 1024, 256) == []
    # pixel centres: 1024 px coordinate x is (x + 0.5) / 4 - 0.5 at 256 px
    matrix = _similarity(5.0, 1.02, (3.0, -2.0), 256)
    at_1024 = linear.rescale_matrix(matrix, 4.0)
    to_256 = np.array([[0.25, 0, -0.375], [0, 0.25, -0.375], [0, 0, 1.0]])
    point = np.array([700.0, 130.0, 1.0])
    np.testing.assert_allclose(at_1024 @ point, np.linalg.inv(to_256) @ matrix @ to_256 @ point, atol=1e-9)
    np.testing.assert_allclose(linear.rescale_matrix(np.eye(3), 4.0), np.eye(3), atol=1e-12)
    shift = np.eye(3)
    shift[:2, 2] = (3.0, -2.0)
    np.testing.assert_allclose(linear.rescale_matrix(shift, 4.0)[:2, 2], (12.0, -8.0), atol=1e-12)
    np.testing.assert_allclose(linear.rescale_matrix(at_1024, 0.25), matrix, atol=1e-9)
    np.testing.assert_allclose(at_1024[:2, :2], matrix[:2, :2], atol=1e-12)


def test_strided_ncc_matches_the_full_one_on_smooth_images():
    fixed = linear.band_pass(_texture(7, 256), 2.0, 16.0)
    known = _similarity(3.0, 1.0, (2.5, -1.5), 256)
    moving = ndimage.affine_transform(fixed, _swap(known)[:2, :2], _swap(known)[:2, 2])
    target = np.linalg.inv(known)
    assert linear.masked_ncc(fixed, moving, target, stride=2) == pytest.approx(
        linear.masked_ncc(fixed, moving, target), abs=0.02
    )
    matrix, ncc = linear.refine(fixed, moving, np.eye(3), "similarity", stride=2)
    assert linear.grid_distance(matrix, target, fixed.shape) < 0.3 and ncc > 0.95


def _fine_texture(seed: int, size: int, coarse_sigma: float = 8.0) -> np.ndarray:
    """'Tissue' with coarse blobs (found at low resolution) and fine detail (only seen at full resolution)."""
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.normal(size=(size, size)), coarse_sigma)
    fine = ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.5)
    image = coarse / coarse.std() + 0.7 * fine / fine.std()
    return (image - image.min()) / np.ptp(image)


def test_pyramid_refines_the_coarse_registration_at_full_resolution():
    """Registered at 64 px, refined at 128 and 256 px: the result is closer to a known similarity than the coarse
    one, and the pyramid's measures are recorded. The IHC is displaced inside a larger section and cropped, so no
    fill enters the frame and only resolution limits the coarse fit."""
    size = 256
    he, ihc = stains(_fine_texture(11, 2 * size))
    crop = slice(size // 2, size // 2 + size)
    he = he[crop, crop]
    shift = (9.3, -6.6)
    # about the larger image's centre, cropped: the same similarity about the crop's centre
    moved = _warp(ihc, _similarity(7.0, 1.03, shift, 2 * size))[crop, crop]
    known = _similarity(7.0, 1.03, shift, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PairRegistration(max_side=64, pyramid_max_side=1024)(he, moved)
        coarse = PairRegistration(max_side=64, pyramid_max_side=0)(he, moved)
    assert result.details["pyramid_sides"] == [128, 256] and coarse.details["pyramid_sides"] == []
    error = linear.grid_distance(known @ result.matrix, np.eye(3), he.shape)
    coarse_error = linear.grid_distance(known @ coarse.matrix, np.eye(3), he.shape)
    assert error < 0.05 and error < 0.5 * coarse_error, (error, coarse_error)  # measured: 0.013 against 0.12 px
    measures = result.details["verdict_measures"]
    assert {"fine_ncc", "fine_margin", "fine_channel_margin", "pyramid_drift_px"} <= set(measures)
    assert result.verdict == "registered", result.verdict_reasons
    assert len(result.details["starts"]) >= 1 and "fine_ncc" in result.details["starts"][0]


def test_fill_mask_finds_padding_but_not_scanned_glass():
    """A flat white or black fill touching the border is fill; noisy near-white glass and a flat white spot inside
    the tissue are not."""
    he, _ = stains(_fine_texture(3, 128))
    rng = np.random.default_rng(0)
    image = he.copy()
    image[:, :20] = np.clip(242 + rng.normal(0, 2.5, (128, 20, 3)), 0, 255).astype(np.uint8)  # scanned glass
    image[60:70, 60:70] = 255  # a lumen-like white spot, not touching the border
    image[:, -16:] = 255  # white fill
    image[-12:, :] = 0  # black fill
    fill = fill_mask(image, margin=0)
    assert fill[:, -16:].all() and fill[-12:, :].all()
    assert not fill[:-12, :20].any() and not fill[60:70, 60:70].any()
    assert fill[:-12, 20:-16].mean() < 0.01  # the tissue
    assert fill_mask(image, margin=2)[:-12, -18:].all()  # grown over the interpolated strip


def test_band_pass_and_ncc_leave_invalid_pixels_out():
    """A step at the edge of an invalid region adds no response, NaN pixels stay out of both NCCs, and the NCC of
    every shift matches the direct masked NCC where both images have holes."""
    image = np.ones((64, 64))
    valid = np.ones((64, 64), bool)
    valid[:, 40:] = False
    image[:, 40:] = 50.0  # the fill's level: an edge only if it were counted
    out = linear.band_pass(image, valid=valid)
    assert np.isnan(out[:, 40:]).all() and np.abs(out[:, :40]).max() < 1e-6
    fixed = linear.band_pass(_texture(4, 64))
    moving = np.roll(fixed, (3, -2), axis=(0, 1)).copy()
    moving[:10] = np.nan
    fixed_holes = fixed.copy()
    fixed_holes[:, :8] = np.nan
    shift = np.eye(3)
    shift[:2, 2] = (-2.0, 3.0)  # fixed(x) = moving(x + (-2, 3)) (x = column, y = row)
    direct = linear.masked_ncc(fixed_holes, moving, shift)
    assert np.isfinite(direct) and direct > 0.99
    scores, (sx, sy) = linear.ncc_all_shifts(fixed_holes, moving, np.ones_like(moving, bool), min_overlap=0.3)
    best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    assert (sx[best], sy[best]) == (2, -3) and scores[best] == pytest.approx(direct, abs=1e-6)


def test_leaving_the_fill_out_removes_its_pull():
    """A displaced IHC with a white fill, registered at 64 px: with the fill read as glass its straight edge pulls
    the fit off by more than 1 px; left out (the default), the fit is within 0.4 px (measured 0.16 against 1.29 px
    at 256 px)."""
    he, ihc = stains(_fine_texture(11, 256))
    known = _similarity(7.0, 1.03, (9.3, -6.6), 256)
    moved = _warp(ihc, known)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = PairRegistration(max_side=64, pyramid_max_side=0, inverse_check=False)(he, moved)
        glass = PairRegistration(max_side=64, pyramid_max_side=0, inverse_check=False, mask_fill=False)(he, moved)
    masked_error = linear.grid_distance(known @ masked.matrix, np.eye(3), he.shape)
    glass_error = linear.grid_distance(known @ glass.matrix, np.eye(3), he.shape)
    assert masked_error < 0.4 < 1.0 < glass_error, (masked_error, glass_error)
    assert masked.details["parameters"]["mask_fill"] is True
