"""Pen ink and other non-stain colour: marks that must never be read as stained tissue.

Hematoxylin, eosin and DAB absorb light along three known optical-density (OD) vectors, so the colour of stained
tissue is confined to a part of the *chroma plane* (OD projected orthogonally to the grey axis, as in
:class:`~her2_monai.stain_features.StainFeatureExtractor`'s hue histogram): hematoxylin at 0 degrees (bluer in IHC
counterstain, about -25), eosin at 56 (orange eosin and red blood cells to about 105) and DAB at 138 (to about 175).
Marker ink on the coverslip is another dye, out of the focal plane:

========  ============================================================================================================
kind      what it looks like in OD
========  ============================================================================================================
green     hue between -160 and -45 degrees: a colour no stain mixture makes (it passes green, which all three absorb)
blue      hue of hematoxylin (-45 to 15) but far more saturated: chroma >= 0.6 OD, where nuclei stay below about 0.45
red       hue between eosin and DAB (80 to 125), strongly saturated (chroma >= 0.9 OD: eosin-rich stroma and blood
          seen at 40x reach 0.6-0.85 in blobs as large as a mark) and passing red light (negative hematoxylin
          concentration: dense DAB over hematoxylin, whose hue is in this arc too, absorbs red)
black     dense and achromatic: total OD >= 3 (darker than RGB 95 in every channel) with chroma < 10% of it; stains
          are dense only with a hue (dark nuclei keep about 20%)
========  ============================================================================================================

Out of focus, a mark is a smooth blob with a soft rim: a *core* that meets the rule is opened with a disk and kept
only as a blob larger than :data:`MIN_INK_AREA` of the image (specks of blood or dense eosin fall away), then grown
into its faded rim (the same hue at half the saturation, or half the density for black) within :data:`HALO` pixels.
The thresholds are set from the physics above and checked on the tune part of the sealed split (histolab group A:
red pen; every BCI and histolab tissue image of tune has < 1% ink; ``benchmarks/trust_inputs.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import disk

from her2_monai.optical_density import optical_density
from her2_monai.stain_features import StainFeatureExtractor

__all__ = [
    "INK_KINDS",
    "MAX_INK_FRACTION",
    "WORK_SIDE",
    "ChromaMaps",
    "InkMeasure",
    "glass_white",
    "chroma_maps",
    "working_copy",
    "measure_ink",
]

#: Ink kinds in report order.
INK_KINDS = ("red", "green", "blue", "black")

#: Share of the stained area (tissue plus ink) that may be ink before a patch is refused; a smaller amount is masked
#: out of the tissue count. Fitted on the tune part (``benchmarks/trust_inputs.py``): the geometric mean of the most
#: ink found on a tune tissue image, tile or demo render (none: the smallest blob that can be found, 0.2%, stands in)
#: and the least on a tune pen-marked tile or synthetic stroke (2.9%, the red smear of high-nuclei-score-red-pen).
MAX_INK_FRACTION = 0.0077

#: Longer side of the working copy the ink is measured on (ink marks are large; the sizes below are in its pixels).
WORK_SIDE = 256
#: The glass a patch's OD is taken against must be at least this bright in every channel (BCI's scanner: 175-185) ...
GLASS_MIN = 150.0
#: ... and at most this saturated (a yellowish or greyish scanner glass; pale pink is tissue).
GLASS_TINT = 0.12
#: Gaussian smoothing (working pixels) of the OD before the colour rules (JPEG colour noise).
SMOOTHING = 1.0
#: Radius (working pixels) of the disk that opens the ink cores: thinner structures (fibres, specks) are tissue.
OPEN_RADIUS = 2
#: Smallest ink blob, as a share of the image.
MIN_INK_AREA = 0.002
#: Shortest side (working pixels) of an image the ink is looked for on.
MIN_SIDE = 64
#: How far (working pixels) a core grows into its faded rim.
HALO = 6

#: Hue arcs (degrees from hematoxylin in the chroma plane) and core chroma (OD) of the coloured inks (rims: half).
_HUE_RULES: dict[str, tuple[float, float, float]] = {
    "green": (-160.0, -45.0, 0.15),
    "blue": (-45.0, 15.0, 0.6),
    "red": (80.0, 125.0, 0.9),
}
#: Black ink: total OD of the core (the rim needs half) and the largest chroma per unit OD (core, rim).
_BLACK_DENSITY = 3.0
_BLACK_CHROMA_RATIO = (0.06, 0.08)

_EXTRACTOR = StainFeatureExtractor()


def working_copy(image: Any, max_side: int | None = WORK_SIDE) -> np.ndarray:
    """``(H, W, 3)`` float RGB in ``[0, 255]``, area-downsampled so its longer side is at most ``max_side``.

    Args:
        image: RGB ``(H, W, 3)`` or ``(3, H, W)`` array or tensor in ``[0, 255]``.
        max_side: longest side kept (``None``: full size).

    Returns:
        The working copy.

    Raises:
        ValueError: if ``image`` is not an RGB image.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: read-only inputs stay untouched
    if tensor.ndim == 3 and tensor.shape[0] == 3 and tensor.shape[-1] != 3:
        tensor = tensor.permute(1, 2, 0)
    if tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {tuple(tensor.shape)}")
    chw = tensor.permute(2, 0, 1)[None]
    height, width = chw.shape[-2:]
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        chw = F.interpolate(chw, size=size, mode="area")
    return chw[0].permute(1, 2, 0).numpy().astype(np.float64)


@dataclass
class ChromaMaps:
    """Per-pixel colour of a working copy in optical density (white point of the image's own glass).

    Attributes:
        od: ``(H, W, 3)`` optical density per RGB channel.
        total: ``(H, W)`` summed OD (how much light is absorbed).
        chroma: ``(H, W)`` length of the OD's projection on the chroma plane (how coloured, in OD units).
        hue: ``(H, W)`` angle in degrees from hematoxylin's direction in the chroma plane.
        concentrations: ``(3, H, W)`` hematoxylin, eosin and DAB concentrations (Ruifrok's vectors, unclipped).
    """

    od: np.ndarray = field(repr=False)
    total: np.ndarray = field(repr=False)
    chroma: np.ndarray = field(repr=False)
    hue: np.ndarray = field(repr=False)
    concentrations: np.ndarray = field(repr=False)


def glass_white(rgb: np.ndarray) -> np.ndarray:
    """The colour of the image's glass, to take optical density against; white when there is no glass in view.

    The glass is the brightest part of a slide: the median colour of the brightest 1% of 4 x 4 blocks. It is taken
    as glass only when it is bright (every channel >= :data:`GLASS_MIN`) and nearly neutral (saturation <=
    :data:`GLASS_TINT`): a patch that is all tissue has a *coloured* brightest part (pale pink stroma), and dividing by
    it would turn the tissue's colours (pink minus pink reads green).

    Args:
        rgb: ``(H, W, 3)`` RGB in ``[0, 255]``.

    Returns:
        ``(3,)`` RGB white point.
    """
    pool = 4 if min(rgb.shape[:2]) >= 8 else 1
    height, width = (rgb.shape[0] // pool) * pool, (rgb.shape[1] // pool) * pool
    blocks = rgb[:height, :width].reshape(height // pool, pool, width // pool, pool, 3).mean(axis=(1, 3))
    blocks = blocks.reshape(-1, 3)
    brightness = blocks.sum(axis=1)
    white = np.median(blocks[brightness >= np.quantile(brightness, 0.99)], axis=0)
    if white.min() >= GLASS_MIN and (white.max() - white.min()) <= GLASS_TINT * white.max():
        return white
    return np.full(3, 255.0)


def chroma_maps(rgb: np.ndarray, sigma: float = SMOOTHING) -> ChromaMaps:
    """Optical density, chroma, hue and stain concentrations of a ``(H, W, 3)`` RGB array in ``[0, 255]``.

    The OD is taken against the image's glass (:func:`glass_white`), so a tinted glass reads as no absorption.
    Concentrations and the chroma plane are those of :class:`~her2_monai.stain_features.StainFeatureExtractor`.

    Args:
        rgb: ``(H, W, 3)`` float or uint8 RGB.
        sigma: Gaussian smoothing of the OD in pixels (0: none).

    Returns:
        The maps.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    # float32 from here on: the maps feed thresholds with margins far above its precision, and the per-tile checks
    # of a whole slide spend most of their time on these arrays (the smoothing twice as fast as in float64).
    od = optical_density(rgb.astype(np.float32), glass_white(rgb).astype(np.float32))
    if sigma > 0:
        od = ndimage.gaussian_filter(od, (sigma, sigma, 0))
    od_t = torch.from_numpy(np.ascontiguousarray(od.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        conc = _EXTRACTOR.concentrations(od_t)[0].numpy()
        plane = torch.einsum("bchw,ck->bkhw", od_t, _EXTRACTOR.chroma_basis)[0].numpy()
    return ChromaMaps(
        od=od,
        total=od.sum(axis=-1),
        chroma=np.hypot(plane[0], plane[1]),
        hue=np.degrees(np.arctan2(plane[1], plane[0])),
        concentrations=conc,
    )


@dataclass
class InkMeasure:
    """Where the ink of one image is.

    Attributes:
        mask: ``(h, w)`` bool ink mask of the working copy.
        kinds: share of the working copy covered by each ink kind (:data:`INK_KINDS`).
    """

    mask: np.ndarray = field(repr=False)
    kinds: dict[str, float]

    @property
    def share(self) -> float:
        """Share of the image covered by ink."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def main_kinds(self) -> list[str]:
        """The ink kinds found, most area first."""
        return [k for k, v in sorted(self.kinds.items(), key=lambda kv: -kv[1]) if v > 0]


def _blobs(core: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """Ink blobs: cores opened and kept when large enough, grown into their rim within :data:`HALO` pixels."""
    min_area = max(1, math.ceil(MIN_INK_AREA * core.size))
    if np.count_nonzero(core) < min_area:
        # Opening only removes pixels, so no blob can reach the smallest area: the usual case on ink-free tissue,
        # answered without the morphology (the same mask).
        return np.zeros_like(core)
    core = ndimage.binary_opening(core, disk(OPEN_RADIUS))
    labels, count = ndimage.label(core)
    if count == 0:
        return core
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    core = keep[labels]
    if not core.any():
        return core
    grown = (rim | core) & ndimage.binary_dilation(core, disk(HALO))
    labels, _ = ndimage.label(grown)
    touched = np.unique(labels[core])
    return np.isin(labels, touched[touched > 0])


def measure_ink(image: Any, maps: ChromaMaps | None = None, max_side: int | None = WORK_SIDE) -> InkMeasure:
    """Find pen ink (red, green, blue, black) in an RGB image.

    Args:
        image: RGB ``(H, W, 3)`` or ``(3, H, W)`` in ``[0, 255]``.
        maps: the :func:`chroma_maps` of its working copy, when the caller has them already.
        max_side: longer side of the working copy.

    Returns:
        The :class:`InkMeasure` (mask at the working copy's size).
    """
    if maps is None:
        maps = chroma_maps(working_copy(image, max_side))
    kinds: dict[str, float] = dict.fromkeys(INK_KINDS, 0.0)
    mask = np.zeros(maps.total.shape, bool)
    if min(mask.shape) < MIN_SIDE:  # a thumbnail-sized patch: too few pixels to tell a mark's blob from stain
        return InkMeasure(mask, kinds)
    for kind in INK_KINDS:
        if kind == "black":
            ratio = maps.chroma / np.maximum(maps.total, 1e-6)
            core = (maps.total >= _BLACK_DENSITY) & (ratio < _BLACK_CHROMA_RATIO[0])
            rim = (maps.total >= 0.5 * _BLACK_DENSITY) & (ratio < _BLACK_CHROMA_RATIO[1])
        else:
            low, high, chroma = _HUE_RULES[kind]
            arc = (maps.hue >= low) & (maps.hue <= high)
            core, rim = arc & (maps.chroma >= chroma), arc & (maps.chroma >= 0.5 * chroma)
            if kind == "red":
                # Dense DAB over hematoxylin has a red-arc hue too, but absorbs red light; a red dye passes it, which
                # reads as a negative hematoxylin concentration.
                core &= maps.concentrations[0] < 0.0
        blobs = _blobs(core, rim) & ~mask  # a pixel counts once, for the first kind that claims it
        kinds[kind] = float(blobs.mean())
        mask |= blobs
    return InkMeasure(mask, kinds)
