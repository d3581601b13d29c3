"""Similarity / affine registration by masked normalised cross-correlation (NCC) of band-passed channels.

The pieces of the default registration method (:class:`~her2_monai.registration.pairwise.PairRegistration` with
``method="ncc"``):

- :func:`band_pass`: a difference of Gaussians of a stain-robust channel, so only tissue architecture (lumens, fat,
  gland and stroma edges) is compared, not the stains' different overall densities;
- :func:`search_similarity`: an exhaustive search over rotation x scale, each with every translation at once
  (masked NCC by FFT), at half resolution: the candidate basins;
- :func:`refine`: a local optimisation (Powell) of the masked NCC over a rigid, similarity or affine transform;
- :func:`pyramid_sides`: the finer levels (up to the image's side) a coarse result is refined at again.

Matrices are ``(3, 3)`` and map fixed pixel coordinates ``(x = column, y = row)`` to moving pixel coordinates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, optimize
from scipy.signal import fftconvolve

__all__ = [
    "MODELS",
    "band_pass",
    "masked_ncc",
    "overlap_fraction",
    "ranking_score",
    "ncc_all_shifts",
    "search_similarity",
    "refine",
    "grid_distance",
    "pyramid_sides",
    "pixel_scale",
    "rescale_matrix",
]

#: Transform models of :func:`refine`, with their number of parameters.
MODELS = {"rigid": 3, "similarity": 4, "affine": 6}


def band_pass(image: np.ndarray, low: float = 1.0, high: float = 8.0, valid: np.ndarray | None = None) -> np.ndarray:
    """Difference of Gaussians ``G(low) - G(high)`` of an image, over its valid pixels only.

    With invalid pixels (``valid`` False, or NaN in ``image``: fill around a displaced scan), each Gaussian is a
    normalised convolution (the blur of the valid values divided by the blur of the valid mask), so the border of the
    invalid region adds no edge of its own, and the result is NaN there: :func:`masked_ncc`,
    :func:`ncc_all_shifts` and :func:`refine` leave NaN pixels out.

    Args:
        image: ``(H, W)`` image.
        low: sigma (px) of the fine Gaussian (removes pixel noise and single nuclei).
        high: sigma (px) of the coarse Gaussian (removes slow density changes that differ between stains).
        valid: ``(H, W)`` bool, the pixels that hold the scan (default: the finite ones).

    Returns:
        ``(H, W)`` float32 image, about zero mean, NaN on invalid pixels.
    """
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    valid = finite if valid is None else np.asarray(valid, bool) & finite
    if valid.all():
        return (ndimage.gaussian_filter(image, low) - ndimage.gaussian_filter(image, high)).astype(np.float32)
    values, weight = np.where(valid, image, 0.0), valid.astype(np.float64)

    def blur(sigma: float) -> np.ndarray:
        return ndimage.gaussian_filter(values, sigma) / np.maximum(ndimage.gaussian_filter(weight, sigma), 1e-6)

    return np.where(valid, blur(low) - blur(high), np.nan).astype(np.float32)


def _warp(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """``out(x) = image(matrix @ x)`` on a grid of ``shape`` (bilinear)."""
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])  # (x, y) <-> (row, col)
    m = swap @ matrix @ swap
    return ndimage.affine_transform(image, m[:2, :2], m[:2, 2], output_shape=shape[:2], order=1, cval=fill)


def _sampled(
    fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fixed samples, moving warped onto them, where both are valid)`` on every ``stride``-th fixed pixel."""
    if stride > 1:
        fixed = fixed[::stride, ::stride]
        matrix = matrix @ np.diag([float(stride), float(stride), 1.0])
    warped = _warp(moving.astype(np.float64), matrix, fixed.shape, np.nan)
    return fixed, warped, np.isfinite(warped) & np.isfinite(fixed)


def masked_ncc(
    fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray, min_overlap: float = 0.25, stride: int = 1
) -> float:
    """NCC of ``fixed`` and ``moving(matrix @ x)`` over the fixed pixels that land inside ``moving``.

    NaN pixels (fill, see :func:`band_pass`) of either image are left out.

    Args:
        fixed: ``(H, W)`` image.
        moving: ``(H', W')`` image.
        matrix: ``(3, 3)`` fixed -> moving pixel coordinates.
        min_overlap: smallest overlap (fraction of the fixed image) that counts as a plausible alignment.
        stride: use every ``stride``-th fixed pixel in each direction (``stride**2`` times fewer samples; for
            images smoothed at about that scale, e.g. a band-pass whose ``low`` sigma is ``>= stride``).

    Returns:
        NCC in ``[-1, 1]``; -1 when the overlap is smaller than ``min_overlap``.
    """
    fixed, warped, inside = _sampled(fixed, moving, matrix, stride)
    if inside.mean() < min_overlap:
        return -1.0
    x = fixed[inside].astype(np.float64)
    y = warped[inside]
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def overlap_fraction(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray, stride: int = 1) -> float:
    """The fraction of ``fixed``'s pixels that are valid (finite) in both images under ``matrix`` (the sample
    :func:`masked_ncc` scores)."""
    return float(_sampled(fixed, moving, matrix, stride)[2].mean())


def ranking_score(ncc: float | np.ndarray, overlap: float | np.ndarray, weight: float) -> float | np.ndarray:
    """``ncc * overlap ** weight``: how the ``ncc`` method ranks alternative alignments (global-search candidates,
    refined starts).

    An NCC over a small overlap is noisier, so a wrong alignment that keeps only part of the images in view can
    outscore the right one by chance (seen on displaced tune pairs, where the fill is left out); ``weight`` > 0
    prefers the alignment that explains more of the images. Local refinement maximises the NCC alone.
    """
    return ncc * np.power(overlap, weight)


def ncc_all_shifts(
    fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray, min_overlap: float = 0.5, overlap_weight: float = 0.0
):
    """Masked NCC of ``fixed(x)`` and ``moving(x - s)`` for every integer shift ``s`` (Padfield 2012, by FFT).

    Only pixels valid in both count: ``mask`` and the finite pixels of ``moving``, and the finite pixels of ``fixed``.

    Args:
        fixed: ``(H, W)`` image (NaN: not valid).
        moving: ``(H, W)`` image (NaN: not valid).
        mask: ``(H, W)`` bool, the moving pixels that hold data.
        min_overlap: smallest overlap (fraction of the image) scored.
        overlap_weight: the scores are :func:`ranking_score` with this weight (0: the NCC itself).

    Returns:
        ``(scores, (sx, sy))``: the ``(2H-1, 2W-1)`` NCC map (-2 where the overlap is under ``min_overlap`` of the
        image) and the matching shift grids.
    """

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return fftconvolve(a, b[::-1, ::-1], mode="full")

    fixed_mask = np.isfinite(fixed).astype(np.float64)
    mask = (np.asarray(mask, bool) & np.isfinite(moving)).astype(np.float64)
    fixed, moving = np.nan_to_num(fixed * fixed_mask), np.nan_to_num(moving * mask)
    overlap = np.maximum(np.rint(corr(fixed_mask, mask)), 1.0)
    sum_f, sum_m = corr(fixed, mask), corr(fixed_mask, moving)
    numerator = corr(fixed, moving) - sum_f * sum_m / overlap
    var_f = np.maximum(corr(fixed * fixed, mask) - sum_f**2 / overlap, 0.0)
    var_m = np.maximum(corr(fixed_mask, moving * moving) - sum_m**2 / overlap, 0.0)
    denominator = np.sqrt(var_f * var_m)
    tolerance = 1e-6 * max(float(denominator.max()), 1e-12)
    scores = np.where(denominator > tolerance, numerator / np.maximum(denominator, tolerance), 0.0)
    scores = ranking_score(np.clip(scores, -1, 1), np.minimum(overlap / fixed.size, 1.0), overlap_weight)
    scores = np.where(overlap >= min_overlap * fixed.size, scores, -2.0)
    height, width = fixed.shape
    sy, sx = np.mgrid[-(height - 1) : height, -(width - 1) : width]
    return scores, (sx, sy)


def _linear_about_center(linear: np.ndarray, translation: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``(3, 3)`` matrix ``p -> L (p - c) + c + t``."""
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = center - linear @ center + translation
    return matrix


def grid_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Mean distance (px) between where two ``(3, 3)`` matrices send a 5x5 grid over the central 60% of ``shape``.

    Args:
        a: ``(3, 3)`` matrix.
        b: ``(3, 3)`` matrix.
        shape: ``(H, W, ...)`` of the image the grid spans.

    Returns:
        The mean distance in pixels.
    """
    height, width = shape[:2]
    xs, ys = np.meshgrid(np.linspace(0.2, 0.8, 5) * (width - 1), np.linspace(0.2, 0.8, 5) * (height - 1))
    points = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    return float(np.linalg.norm((a @ points - b @ points)[:2], axis=0).mean())


def search_similarity(
    fixed: np.ndarray,
    moving: np.ndarray,
    max_angle: float = 20.0,
    angle_step: float = 2.0,
    scales: tuple[float, ...] = (0.95, 1.0, 1.05),
    max_shift: float = 0.15,
    count: int = 4,
    prior_weight: float = 0.02,
    overlap_weight: float = 0.0,
) -> list[tuple[float, np.ndarray]]:
    """The best distinct similarity transforms over a rotation x scale grid, every translation tried at once.

    For each rotation and scale about the image centre the moving image is resampled, both images are halved, and the
    masked NCC of every translation is computed by FFT (only the overlap counts, so a fill around a displaced image
    is ignored). The best translation of each (rotation, scale) is a candidate; ``prior_weight`` handicaps large
    rotations and shifts a little (pairs are usually roughly aligned, and repetitive tissue gives near-ties).

    Args:
        fixed: ``(H, W)`` band-passed fixed channel.
        moving: ``(H', W')`` band-passed moving channel.
        max_angle: largest rotation searched, degrees.
        angle_step: rotation step, degrees.
        scales: moving/fixed scale factors searched.
        max_shift: largest translation searched, as a fraction of the side.
        count: candidates returned.
        prior_weight: NCC handicap at the largest rotation and shift (half each).
        overlap_weight: candidates are ranked by :func:`ranking_score` with this weight.

    Returns:
        Up to ``count`` ``(score, matrix)`` pairs, best first, each more than 5% of the side (grid distance) from the
        better ones.
    """
    center = (np.asarray(fixed.shape[::-1], float) - 1) / 2
    half = fixed[::2, ::2].astype(np.float64)
    limit = max_shift * np.asarray(fixed.shape[::-1], float) / 2  # (x, y) at half resolution
    angles = np.arange(-max_angle, max_angle + 1e-9, angle_step) if max_angle > 0 else np.zeros(1)
    found: list[tuple[float, np.ndarray]] = []
    for scale in scales:
        for angle in angles:
            a = math.radians(angle)
            linear = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            matrix = _linear_about_center(linear, np.zeros(2), center)
            rotated = _warp(moving, matrix, fixed.shape, 0.0)[::2, ::2].astype(np.float64)
            valid = _warp(np.ones_like(moving), matrix, fixed.shape, 0.0)[::2, ::2] > 0.99
            scores, (sx, sy) = ncc_all_shifts(half, rotated, valid, overlap_weight=overlap_weight)
            inside = (np.abs(sx) <= limit[0]) & (np.abs(sy) <= limit[1])
            distance = np.hypot(sx / max(limit[0], 1.0), sy / max(limit[1], 1.0))
            handicap = prior_weight * (abs(angle) / max(max_angle, 1.0) + distance) / 2
            scores = np.where(inside, scores - handicap, -2.0)
            index = np.unravel_index(int(np.argmax(scores)), scores.shape)
            shift = 2.0 * np.array([sx[index], sy[index]], float)
            # fixed(x) ~ resampled(x - shift) = moving(M (x - shift))
            candidate = matrix.copy()
            candidate[:2, 2] = matrix[:2, 2] - matrix[:2, :2] @ shift
            found.append((float(scores[index]), candidate))
    found.sort(key=lambda c: -c[0])
    chosen: list[tuple[float, np.ndarray]] = []
    separation = 0.05 * max(fixed.shape)
    for score, matrix in found:
        if all(grid_distance(matrix, other, fixed.shape) > separation for _, other in chosen):
            chosen.append((score, matrix))
        if len(chosen) == count:
            break
    return chosen


def _update(parameters: np.ndarray, model: str, center: np.ndarray) -> np.ndarray:
    """The ``(3, 3)`` update (applied before the start matrix) for ``model``'s unit-scaled ``parameters``:
    rigid ``(angle 1 deg, tx, ty)``; similarity ``(angle, log-scale x 0.01, tx, ty)``; affine ``(4 linear terms
    x 0.01, tx, ty)``."""
    if model == "affine":
        linear = np.eye(2) + 0.01 * parameters[:4].reshape(2, 2)
    else:
        a = math.radians(parameters[0])
        scale = math.exp(0.01 * parameters[1]) if model == "similarity" else 1.0
        linear = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _linear_about_center(linear, parameters[-2:], center)


def refine(
    fixed: np.ndarray,
    moving: np.ndarray,
    matrix: np.ndarray,
    model: str = "similarity",
    tolerance: float = 0.05,
    max_evaluations: int = 800,
    stride: int = 1,
) -> tuple[np.ndarray, float]:
    """Maximise the masked NCC of ``fixed`` and ``moving(T x)`` over ``T = matrix @ U``, ``U`` of ``model``.

    Powell's method on unit-scaled parameters (1 degree, 1% of scale or of a matrix term, 1 px): no gradients, so the
    overlap mask may change between evaluations.

    Args:
        fixed: ``(H, W)`` band-passed fixed channel.
        moving: ``(H', W')`` band-passed moving channel.
        matrix: ``(3, 3)`` start (fixed -> moving pixel coordinates).
        model: one of :data:`MODELS`.
        tolerance: parameter tolerance in those units.
        max_evaluations: largest number of NCC evaluations.
        stride: NCC on every ``stride``-th fixed pixel (:func:`masked_ncc`).

    Returns:
        ``(matrix, ncc)``: the refined matrix and its masked NCC (on those samples).

    Raises:
        ValueError: on an unknown model.
    """
    if model not in MODELS:
        raise ValueError(f"unknown transform model '{model}'; expected one of {list(MODELS)}")
    center = (np.asarray(fixed.shape[::-1], float) - 1) / 2
    moving = moving.astype(np.float64)

    def cost(parameters: np.ndarray) -> float:
        return -masked_ncc(fixed, moving, matrix @ _update(parameters, model, center), stride=stride)

    start = np.zeros(MODELS[model])
    result = optimize.minimize(
        cost, start, method="Powell", options={"xtol": tolerance, "ftol": 1e-6, "maxfev": max_evaluations}
    )
    best, value = (result.x, -float(result.fun)) if -result.fun >= -cost(start) else (start, -cost(start))
    return matrix @ _update(best, model, center), value


def pixel_scale(factor: float) -> np.ndarray:
    """``(3, 3)`` map from pixel coordinates of an image to those of its copy resized by ``factor`` (new side / old
    side), pixel centres kept."""
    return np.array([[factor, 0, 0.5 * factor - 0.5], [0, factor, 0.5 * factor - 0.5], [0, 0, 1.0]])


def rescale_matrix(matrix: np.ndarray, factor: float) -> np.ndarray:
    """Express a pixel-coordinate matrix at another resolution: ``S A S^-1``, ``S`` the pixel-centre mapping of a
    size change by ``factor`` (new side / old side).

    Args:
        matrix: ``(3, 3)`` fixed -> moving pixel coordinates at the old resolution.
        factor: new / old size ratio (the same for both images).

    Returns:
        The ``(3, 3)`` matrix at the new resolution.
    """
    scale = pixel_scale(1 / factor)  # new -> old pixel coordinates
    return np.linalg.inv(scale) @ matrix @ scale


def pyramid_sides(base: int, full: int, top: int) -> list[int]:
    """The longer sides of the finer levels a ``base``-side registration is refined at again.

    The finest level is ``min(full, top)``, each coarser one half the next; levels under 1.25x ``base`` are left
    out.

    Args:
        base: longer side of the coarse registration.
        full: longer side of the images.
        top: largest side to refine at (``<= base``: no pyramid).

    Returns:
        The sides, coarse to fine (empty when there is nothing finer).
    """
    last = min(int(full), int(top))
    sides: list[int] = []
    side = last
    while side >= 1.25 * base:
        sides.insert(0, side)
        side //= 2
    return sides
