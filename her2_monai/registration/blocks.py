"""Block matching: a second estimate of an alignment, from local shifts fitted by a robust affine transform.

The ``ncc`` method's pyramid refines one alignment with Powell's method on a global NCC. At the finest level that
objective is peaky (a 1 degree change moves the image edge by more than its correlation length), so the refinement
can stay on a nearby maximum although a better one is close (docs/registration.md, third and fifth looks). Block
matching reaches it another way: each block of the fixed channel is matched (masked NCC, every shift within a radius)
in the moving channel as currently aligned, and one affine transform is fitted to the block shifts by RANSAC; the
search radius then shrinks. ``PairRegistration`` refines that estimate after its affine stage and keeps it only when
the finest level's NCC prefers it.

Matrices are ``(3, 3)`` and map fixed pixel coordinates ``(x = column, y = row)`` to moving pixel coordinates.
"""

from __future__ import annotations

import numpy as np

from her2_monai.registration import linear

__all__ = ["block_shifts", "robust_affine", "block_matching"]


def _parabola(left: float, centre: float, right: float) -> float:
    """Sub-pixel offset of a peak from three samples (0 when they do not form a peak)."""
    curvature = left - 2 * centre + right
    return 0.5 * (left - right) / curvature if curvature < 0 else 0.0


def block_shifts(fixed: np.ndarray, aligned: np.ndarray, block: int, radius: int, min_valid: float = 0.8) -> np.ndarray:
    """The shift of every block of ``fixed`` in ``aligned`` (the moving channel resampled on the fixed grid).

    Blocks step by half their side. A block is left out when less than ``min_valid`` of it (or of the same square in
    ``aligned``) holds data (NaN: fill or outside the moving image), or when its best shift lies on the search
    border (the match is elsewhere, or nowhere).

    Args:
        fixed: ``(H, W)`` band-passed fixed channel (NaN: not valid).
        aligned: ``(H, W)`` band-passed moving channel on the fixed grid (NaN: not valid).
        block: block side (px).
        radius: largest shift searched in each direction (px).
        min_valid: smallest valid fraction of a block.

    Returns:
        ``(K, 5)`` rows ``(x, y, sx, sy, ncc)``: block centre, sub-pixel shift (``fixed(p) ~ aligned(p - s)``) and
        the masked NCC at the best integer shift.
    """
    height, width = fixed.shape
    side = block + 2 * radius
    rows = []
    for y0 in range(0, height - block + 1, max(1, block // 2)):
        for x0 in range(0, width - block + 1, max(1, block // 2)):
            patch = fixed[y0 : y0 + block, x0 : x0 + block]
            window = np.full((side, side), np.nan, np.float32)
            ya, xa = y0 - radius, x0 - radius
            sy0, sx0, sy1, sx1 = max(ya, 0), max(xa, 0), min(ya + side, height), min(xa + side, width)
            window[sy0 - ya : sy1 - ya, sx0 - xa : sx1 - xa] = aligned[sy0:sy1, sx0:sx1]
            core = window[radius : radius + block, radius : radius + block]
            if np.isfinite(patch).mean() < min_valid or np.isfinite(core).mean() < min_valid:
                continue
            padded = np.full((side, side), np.nan, np.float32)
            padded[radius : radius + block, radius : radius + block] = patch
            scores, (sx, sy) = linear.ncc_all_shifts(padded, window, np.isfinite(window), min_overlap=0.0)
            inside = (np.abs(sx) <= radius) & (np.abs(sy) <= radius)
            scores = np.where(inside, scores, -2.0)
            i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
            if abs(sx[i, j]) == radius or abs(sy[i, j]) == radius:
                continue
            dy = _parabola(scores[i - 1, j], scores[i, j], scores[i + 1, j])
            dx = _parabola(scores[i, j - 1], scores[i, j], scores[i, j + 1])
            centre = (x0 + (block - 1) / 2, y0 + (block - 1) / 2)
            rows.append((*centre, sx[i, j] + dx, sy[i, j] + dy, scores[i, j]))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _fit(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares affine ``(3, 3)`` matrix sending ``source`` points to ``target`` points."""
    design = np.c_[source, np.ones(len(source))] * np.sqrt(weights)[:, None]
    solution = np.linalg.lstsq(design, target * np.sqrt(weights)[:, None], rcond=None)[0]
    matrix = np.eye(3)
    matrix[:2] = solution.T
    return matrix


def robust_affine(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray, threshold: float, trials: int = 300, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An affine transform fitted to point pairs with outliers (RANSAC on 3 pairs, then weighted least squares on the
    inliers, three times).

    Args:
        source: ``(K, 2)`` points.
        target: ``(K, 2)`` where they should go.
        weights: ``(K,)`` non-negative weights (a trial's support is the weight of its inliers).
        threshold: largest residual (px) of an inlier.
        trials: random minimal samples tried.
        seed: random seed (the result is deterministic).

    Returns:
        ``(matrix, inliers)``: the ``(3, 3)`` matrix and the ``(K,)`` bool inlier mask.

    Raises:
        ValueError: with fewer than 3 point pairs.
    """
    count = len(source)
    if count < 3:
        raise ValueError(f"an affine fit needs at least 3 point pairs, got {count}")
    homogeneous = np.c_[source, np.ones(count)]
    rng = np.random.default_rng(seed)
    best_support, inliers = -1.0, np.ones(count, bool)
    for _ in range(trials):
        sample = rng.choice(count, 3, replace=False)
        matrix = _fit(source[sample], target[sample], np.ones(3))
        close = np.linalg.norm(homogeneous @ matrix[:2].T - target, axis=1) < threshold
        support = float(weights[close].sum())
        if support > best_support:
            best_support, inliers = support, close
    matrix = np.eye(3)
    for _ in range(3):
        if inliers.sum() < 3:
            break
        matrix = _fit(source[inliers], target[inliers], np.maximum(weights[inliers], 1e-6))
        inliers = np.linalg.norm(homogeneous @ matrix[:2].T - target, axis=1) < threshold
    return matrix, inliers


def block_matching(
    fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray, min_inliers: int = 6
) -> tuple[np.ndarray | None, dict[str, float]]:
    """Re-estimate an alignment from block shifts, in three passes of shrinking search radius.

    Block side, radii and inlier threshold follow the image's longer side ``S``: blocks of ``S / 8``; radii ``S /
    32``, ``3 S / 256`` and ``max(3, S / 256)``; inliers within ``max(2, S / 256)`` px (at 1024 px: 128 px blocks,
    radii 32, 12 and 4 px, 4 px; chosen once on tune pairs, not searched).

    Args:
        fixed: ``(H, W)`` band-passed fixed channel (NaN: not valid).
        moving: ``(H', W')`` band-passed moving channel (NaN: not valid).
        matrix: ``(3, 3)`` current alignment, fixed -> moving.
        min_inliers: fewest inlier blocks for an estimate.

    Returns:
        ``(matrix or None, info)``: the new ``(3, 3)`` alignment (``None`` when too few blocks agree) and
        ``blocks`` / ``inliers`` of the first pass (how much of the image the estimate rests on).
    """
    side = max(fixed.shape)
    block = max(16, side // 8)
    radii = (max(3, round(side / 32)), max(3, round(3 * side / 256)), max(3, round(side / 256)))
    threshold = max(2.0, side / 256)
    info: dict[str, float] = {}
    current = np.asarray(matrix, float)
    for radius in radii:
        aligned = linear._warp(np.asarray(moving, np.float64), current, fixed.shape, np.nan)
        rows = block_shifts(fixed, aligned, block, radius)
        rows = rows[rows[:, 4] > 0]  # an anti-correlated best match is no match
        if len(rows) < min_inliers:
            return None, {**info, "blocks": info.get("blocks", len(rows))}
        centres, shifts, weights = rows[:, :2], rows[:, 2:4], rows[:, 4]
        # the block centre p matches the moving point current(p - s)
        target = np.c_[centres - shifts, np.ones(len(rows))] @ current[:2].T
        current, inliers = robust_affine(centres, target, weights, threshold)
        info.setdefault("blocks", float(len(rows)))
        info.setdefault("inliers", float(inliers.sum()))
        if inliers.sum() < min_inliers:
            return None, info
    return current, info
