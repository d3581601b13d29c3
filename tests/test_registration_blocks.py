"""Block matching: block shifts, the robust affine fit, and the estimate the ``ncc`` pyramid keeps when it is better."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from registration_helpers import similarity, stains
from scipy import ndimage

from her2_monai.registration import PairRegistration, RegistrationResult, blocks, linear, warp_rgb


def _texture(seed: int, size: int) -> np.ndarray:
    """Band-limited 'tissue' with detail at several scales, in [0, 1]."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=(size, size)), 6.0)
    image = image / image.std() + 0.8 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0) / 0.08
    return (image - image.min()) / np.ptp(image)


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``out(x) = image(matrix @ x)`` for an ``(H, W)`` image, NaN outside."""
    return linear._warp(image.astype(np.float64), matrix, image.shape, np.nan)


def test_block_shifts_find_a_known_translation_to_a_fraction_of_a_pixel():
    fixed = linear.band_pass(_texture(0, 160), 1.0, 8.0)
    shift = np.array([3.4, -2.6])  # fixed(p) = moving(p - shift)
    translate = np.eye(3)
    translate[:2, 2] = shift  # aligned(q) = fixed(q + shift)
    aligned = _warp(fixed, translate)
    rows = blocks.block_shifts(fixed, aligned, 40, 8)
    assert len(rows) >= 9
    assert np.abs(np.median(rows[:, 2:4], axis=0) - shift).max() < 0.25, rows[:, 2:4]
    assert np.all(rows[:, 4] > 0.8)  # the same image: every block matches
    # a block whose best match lies on the search border is left out: the shift is larger than the radius
    assert len(blocks.block_shifts(fixed, aligned, 40, 2)) < len(rows) // 2


def test_robust_affine_ignores_outliers():
    rng = np.random.default_rng(1)
    truth = np.array([[1.02, 0.03, 4.0], [-0.02, 0.99, -3.0], [0.0, 0.0, 1.0]])
    source = rng.uniform(0, 200, (40, 2))
    target = (np.c_[source, np.ones(40)] @ truth[:2].T) + rng.normal(scale=0.2, size=(40, 2))
    target[:12] += rng.uniform(15, 40, (12, 2))  # 30% wrong matches
    matrix, inliers = blocks.robust_affine(source, target, np.ones(40), threshold=2.0)
    assert inliers[12:].all() and not inliers[:12].any()
    points = np.c_[source, np.ones(40)].T
    assert np.linalg.norm((matrix @ points - truth @ points)[:2], axis=0).max() < 0.3  # noise 0.2 px per point
    with pytest.raises(ValueError, match="at least 3 point pairs, got 2"):
        blocks.robust_affine(source[:2], target[:2], np.ones(2), 2.0)


def test_block_matching_moves_a_nearby_start_onto_the_alignment():
    size = 256
    texture = _texture(2, 2 * size)
    crop = slice(size // 2, size // 2 + size)
    known = similarity(4.0, 1.02, (5.0, -3.0), 2 * size)
    fixed = linear.band_pass(texture[crop, crop], 2.0, 16.0)
    moving = linear.band_pass(_warp(texture, np.linalg.inv(known))[crop, crop], 2.0, 16.0)
    target = similarity(4.0, 1.02, (5.0, -3.0), size)  # fixed -> moving: the same similarity about the crop centre
    start = target @ similarity(1.5, 1.0, (4.0, 3.0), size)  # about 6 px off
    estimate, info = blocks.block_matching(fixed, moving, start)
    assert estimate is not None and info["inliers"] >= 6
    before, after = (linear.grid_distance(m, target, fixed.shape) for m in (start, estimate))
    assert before > 4.0 and after < 0.3, (before, after)
    # unrelated tissue: the blocks do not agree on one transform
    unrelated = linear.band_pass(_texture(9, size), 2.0, 16.0)
    estimate, info = blocks.block_matching(fixed, unrelated, np.eye(3))
    assert estimate is None or info["inliers"] < 0.3 * info["blocks"], info


def test_pair_registration_records_the_block_matching_stage():
    size = 192
    he, ihc = stains(_texture(4, 2 * size))
    crop = slice(size // 2, size // 2 + size)
    known = similarity(6.0, 1.0, (4.0, -5.0), 2 * size)
    shape = ihc.shape[:2]
    moved = warp_rgb(ihc, RegistrationResult("affine", known, known, 1.0, shape, shape, shape))[crop, crop]
    he = he[crop, crop]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PairRegistration(max_side=96, inverse_check=False)(he, moved)
        plain = PairRegistration(max_side=96, inverse_check=False, block_matching=False)(he, moved)
    stage = result.details["block_matching"]
    assert {"blocks", "inliers", "kept"} <= set(stage) and stage["inliers"] >= 6, stage
    assert plain.details["block_matching"] == {} and plain.details["parameters"]["block_matching"] is False
    # moved(x) = ihc(known x), known about the crop centre: the registration (H&E -> moved) is its inverse
    target = np.linalg.inv(similarity(6.0, 1.0, (4.0, -5.0), size))
    assert linear.grid_distance(result.matrix, target, he.shape) < 0.5
    # without a pyramid level (the image is no larger than max_side) there is no block-matching stage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = PairRegistration(max_side=size, inverse_check=False)(he, moved)
    assert small.details["block_matching"] == {}
