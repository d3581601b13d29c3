"""Synthetic pen marks: a marker stroke drawn onto a real or demo patch, to test the pen-ink check.

A pathologist's marker writes on the coverslip, above the focal plane: on the scan it is a translucent dye film with a
soft, out-of-focus rim. :func:`draw_pen_stroke` renders it that way: a curved band, Gaussian-blurred, added in optical
density (Beer-Lambert: the ink's absorbance adds to the tissue's), so tissue shows through a thin stroke as it does
through real ink.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from her2_monai.optical_density import intensity_from_optical_density, optical_density

__all__ = ["PEN_COLOURS", "draw_pen_stroke"]

#: RGB of a full-strength stroke of common histology markers over white glass.
PEN_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 45),
    "green": (40, 140, 70),
    "blue": (35, 60, 170),
    "black": (35, 35, 40),
}


def draw_pen_stroke(
    image: np.ndarray, colour: str, width: float = 0.06, blur: float = 0.01, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one marker stroke across an RGB patch.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        colour: a key of :data:`PEN_COLOURS`.
        width: stroke width as a share of the shorter side.
        blur: Gaussian blur of the stroke's edge (defocus) as a share of the shorter side.
        seed: chooses the curve.

    Returns:
        ``(marked, alpha)``: the uint8 image with the stroke, and the ``(H, W)`` ink opacity in ``[0, 1]``.

    Raises:
        ValueError: for an unknown colour, a non-RGB image or a width outside ``(0, 1]``.
    """
    if colour not in PEN_COLOURS:
        raise ValueError(f"colour must be one of {sorted(PEN_COLOURS)}, got {colour!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    rng = np.random.default_rng(seed)
    height, wide = image.shape[:2]
    side = min(height, wide)
    # A quadratic Bezier curve from the left edge to the right edge, bending through a random middle point.
    start = np.array([rng.uniform(0.0, 0.3) * height, 0.0])
    middle = np.array([rng.uniform(0.0, 1.0) * height, wide / 2])
    end = np.array([rng.uniform(0.7, 1.0) * height, wide - 1.0])
    t = np.linspace(0.0, 1.0, 4 * max(height, wide))[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * middle + t**2 * end
    line = np.zeros((height, wide), bool)
    rows = np.clip(curve[:, 0].round().astype(int), 0, height - 1)
    cols = np.clip(curve[:, 1].round().astype(int), 0, wide - 1)
    line[rows, cols] = True
    alpha = (ndimage.distance_transform_edt(~line) <= width * side / 2).astype(np.float64)
    if blur > 0:
        alpha = ndimage.gaussian_filter(alpha, blur * side)
    ink = optical_density(np.asarray(PEN_COLOURS[colour], np.float64))
    od = optical_density(image.astype(np.float64)) + alpha[..., None] * ink
    marked = np.clip(intensity_from_optical_density(od), 0, 255).round().astype(np.uint8)
    return marked, alpha
