"""Can this image get a HER2 score at all? The checks every prediction passes before a score is given.

Stained tissue is coloured (haematoxylin blue, eosin pink, DAB brown); glass, background and blank or transparent
images are white or grey. :func:`tissue_mask` marks as tissue what is coloured *and* absorbs light against the image's
own glass: the smoothed HSV saturation above Otsu's threshold clamped to a measured range (the rule a whole-slide tiler
uses on a thumbnail), or a stain-coloured optical density (total OD >= 0.15 with chroma >= 8% of it, which finds the
pale counterstain of a HER2 0 IHC that saturation misses), and in both cases at least 0.1 OD darker than the image's
white point, so a tinted glass is no tissue. :class:`TissueCheckd` applies it to each stain of a record, with these
refusals (the reason codes of ``refer_reasons``):

* ``no_tissue``: smaller than ``min_size`` pixels a side, one colour (blank, fully transparent), greyscale (equal
  channels, e.g. a 16-bit greyscale file), or less than :data:`NO_TISSUE_BELOW` tissue;
* ``insufficient_tissue``: some tissue, but less than ``min_tissue_fraction`` (fitted on the tune part, recorded in the
  model file);
* ``pen_ink``: more than ``max_ink_fraction`` of the stained area is marker ink (:mod:`her2_monai.transforms.ink`);
  less ink is tolerated and masked out of the tissue count;
* ``wrong_marker``: an IHC (declared, or an image of unknown stain whose eosin index says IHC) whose DAB fills nuclei
  or cytoplasm instead of outlining membranes (:mod:`her2_monai.transforms.marker`).

The thresholds were chosen on the tune part of the sealed split and the demo renders (``benchmarks/trust_inputs.py``,
``docs/input_checks.md``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu

from her2_monai.constants import HE_KEY, IHC_KEY, STAIN_KNOWN_KEY
from her2_monai.stain_features import eosin_index
from her2_monai.transforms.ink import (
    MAX_INK_FRACTION,
    WORK_SIDE,
    ChromaMaps,
    InkMeasure,
    chroma_maps,
    measure_ink,
    working_copy,
)
from her2_monai.transforms.ink import SMOOTHING as INK_SMOOTHING
from her2_monai.transforms.marker import DabPattern, dab_pattern

__all__ = [
    "TISSUE_KEYS",
    "INPUT_REFUSALS",
    "MIN_TISSUE_FRACTION",
    "NO_TISSUE_BELOW",
    "IHC_EOSIN_INDEX_BELOW",
    "channel_range",
    "saturation",
    "bounded_otsu",
    "tissue_mask",
    "tissue_fraction",
    "InputCheck",
    "TissueCheckd",
]

#: Output keys of :class:`TissueCheckd`: per-slot tissue share, 1/0 verdict, the warnings (``"; "``-separated) and
#: the reason codes (``","``-separated, from :data:`INPUT_REFUSALS`) when refused.
TISSUE_KEYS = ("tissue_fraction", "tissue_ok", "tissue_issue", "tissue_reasons")
#: Reason codes of a refused input, in the order ``refer_reasons`` lists them.
INPUT_REFUSALS = ("no_tissue", "insufficient_tissue", "pen_ink", "wrong_marker")
#: Bounds of the saturation threshold (measured after smoothing: glass tinted (240, 236, 228) with pixel noise has no
#: pixel above 0.06; the palest demo IHC patch 4.6% above 0.08, real BCI/MIST patches >= 10%).
SATURATION_RANGE = (0.06, 0.08)
#: Gaussian smoothing (pixels) of the saturation map before thresholding.
SMOOTHING = 2.0
#: Longer side of the working copy tissue is measured on (the share does not need more pixels).
TISSUE_SIDE = 512
#: Smallest total optical density against the image's white point for any tissue pixel (a tinted glass has none).
MIN_DENSITY = 0.1
#: A pixel of at least this total OD whose chroma is at least :data:`STAIN_CHROMA` of it is stained tissue.
STAIN_DENSITY = 0.15
STAIN_CHROMA = 0.08
#: Below this tissue share an image has no tissue at all (``no_tissue``; above it, ``insufficient_tissue``).
NO_TISSUE_BELOW = 0.01
#: Smallest tissue share for a HER2 score, fitted on the tune part and the demo renders (benchmarks/trust_inputs.py):
#: the geometric mean of the most "tissue" on a tune background tile not refused for ink (4.6%, no-tissue-line: a
#: darker band of glass) and the least on a tune tissue image or a demo render (15.4%, a pale demo HER2 0 IHC; 28.8%
#: on real tune images). Recorded in the model file by training (``model_metadata.min_tissue_fraction``);
#: ``inference.json``'s ``min_tissue_fraction`` overrides it.
MIN_TISSUE_FRACTION = 0.084
#: An image of unknown stain is judged as an IHC (wrong-marker check) when its eosin index is below this: tune H&E
#: >= 0.097, tune IHC <= -0.043 (BCI; :func:`~her2_monai.stain_features.eosin_index`).
IHC_EOSIN_INDEX_BELOW = 0.03


def _hwc(image: Any) -> np.ndarray:
    """``(H, W, 3)`` float array in ``[0, 255]`` from ``(H, W, 3)`` or ``(3, H, W)`` arrays or tensors."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {array.shape}")
    return array.astype(np.float64)


def channel_range(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max, min)`` over the colour channels of an ``(H, W, 3)`` array, each ``(H, W)`` of its dtype.

    Channel by channel: a reduction over a last axis of 3 is several times slower than these element-wise passes.
    """
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)


def saturation(image: Any) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` per pixel, ``(H, W)`` in ``[0, 1]`` (0 for black)."""
    high, low = channel_range(_hwc(image))
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def bounded_otsu(values: np.ndarray, low: float, high: float, flat: float, min_spread: float = 0.0) -> float:
    """Otsu's threshold of ``values`` clipped to ``[low, high]``: the one bounded-Otsu rule of the tissue masks.

    Otsu's method splits a bimodal histogram (white glass against stained tissue). Where one side is (almost) missing
    it splits the other instead: nuclei from stroma on an all-tissue image, JPEG noise from glass on a blank one. The
    bounds are the range a real glass/tissue split falls in.

    Args:
        values: the values to threshold (any shape).
        low: smallest threshold returned.
        high: largest threshold returned.
        flat: the threshold when the values spread by no more than ``min_spread`` (Otsu is undefined there).
        min_spread: largest ``max - min`` still treated as flat.

    Returns:
        The threshold.
    """
    if float(np.max(values)) - float(np.min(values)) <= min_spread:
        return float(flat)
    return min(max(float(low), float(threshold_otsu(values))), float(high))


def _saturated(rgb: np.ndarray, saturation_range: tuple[float, float], sigma: float) -> np.ndarray:
    """Smoothed saturation above Otsu's threshold clamped to ``saturation_range``.

    A patch is often nearly all tissue, where Otsu would split the tissue itself (pale haematoxylin-only IHC against
    stained areas), hence the upper bound; the lower bound keeps the JPEG noise and tint of blank glass out.
    """
    low, high = saturation_range
    sat = saturation(rgb).astype(np.float32)  # float32 is plenty for a threshold and halves the smoothing's time
    if sigma > 0:
        sat = gaussian_filter(sat, sigma)
    return sat > bounded_otsu(sat, low, high, flat=low)


def tissue_mask(
    image: Any,
    saturation_range: tuple[float, float] = SATURATION_RANGE,
    sigma: float = SMOOTHING,
    max_side: int | None = TISSUE_SIDE,
    maps: ChromaMaps | None = None,
) -> np.ndarray:
    """Tissue pixels of a working copy of an RGB image (see the module docstring).

    Args:
        image: RGB ``(H, W, 3)`` or ``(3, H, W)`` in ``[0, 255]``.
        saturation_range: ``(low, high)`` bounds of the saturation threshold.
        sigma: Gaussian smoothing of the saturation map in pixels (pixel noise of blank glass averages out).
        max_side: the image is area-downsampled to this longer side first (``None``: full size).
        maps: ``chroma_maps(working copy)`` (the ink check's smoothing) when the caller has them already
            (:meth:`TissueCheckd.check` shares them with the ink check when both work on the same copy).

    Returns:
        ``(h, w)`` bool mask of the working copy.
    """
    rgb = working_copy(image, max_side)
    if maps is None:
        maps = chroma_maps(rgb, sigma=INK_SMOOTHING)
    elif maps.total.shape != rgb.shape[:2]:
        raise ValueError(f"maps of a {maps.total.shape} copy given for a {rgb.shape[:2]} working copy")
    dense = maps.total > MIN_DENSITY
    stained = (maps.total > STAIN_DENSITY) & (maps.chroma >= STAIN_CHROMA * maps.total)
    return dense & (_saturated(rgb, saturation_range, sigma) | stained)


def tissue_fraction(image: Any, saturation_range: tuple[float, float] = SATURATION_RANGE) -> float:
    """Share of tissue pixels of an RGB image (see :func:`tissue_mask`; pen ink is not subtracted)."""
    return float(tissue_mask(image, saturation_range).mean())


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="nearest")[0, 0].numpy() > 0.5


@dataclass
class InputCheck:
    """What the checks found in one image.

    Attributes:
        tissue: share of the image that is stained tissue (ink excluded).
        ink_fraction: share of the stained area (tissue plus ink) that is pen ink.
        ink: the ink measure (``None`` when the image failed an earlier check).
        pattern: the DAB pattern when the wrong-marker check ran, else ``None``.
        issues: ``(reason code, sentence)`` of every refusal; empty when the image passed.
    """

    tissue: float = 0.0
    ink_fraction: float = 0.0
    ink: InkMeasure | None = field(default=None, repr=False)
    pattern: DabPattern | None = None
    issues: list[tuple[str, str]] = field(default_factory=list)


class TissueCheckd(MapTransform):
    """Check each stain image of a record before it is resized and scored: tissue, pen ink, the IHC marker.

    Writes ``tissue_fraction`` (``(len(keys),)`` float, ``-1`` for an absent stain), ``tissue_ok`` (float 1/0: every
    given image passed), ``tissue_issue`` (``""`` or one sentence per refusal, each naming the stain, what was found,
    how much and the threshold, joined by ``"; "``) and ``tissue_reasons`` (the codes of :data:`INPUT_REFUSALS` that
    apply, joined by ``","``). Runs after :class:`~her2_monai.transforms.load.LoadStainsd` (images ``(3, H, W)`` in
    ``[0, 255]``, alpha already composited on white, so a transparent image is blank) and before any resizing, so
    ``min_size`` is the original size.

    Args:
        keys: stain keys; the image under ``ihc`` is an IHC, the one under ``he`` an H&E unless the record's
            ``stain_known_key`` is 0 (an image of unknown stain, judged by its eosin index).
        min_size: smallest accepted side in pixels.
        min_tissue_fraction: smallest share of tissue pixels for a score (``None``: :data:`MIN_TISSUE_FRACTION`).
        saturation_range: see :func:`tissue_mask`.
        max_ink_fraction: largest share of the stained area that may be pen ink (1 turns the ink check off).
        marker_check: run the wrong-marker check on IHC images.
        stain_known_key: the record's flag that the stains were declared.

    Raises:
        ValueError: for a non-positive ``min_size`` or a fraction outside ``[0, 1]``, naming the setting.
    """

    def __init__(
        self,
        keys: Sequence[str] = (HE_KEY, IHC_KEY),
        min_size: int = 32,
        min_tissue_fraction: float | None = None,
        saturation_range: Sequence[float] = SATURATION_RANGE,
        max_ink_fraction: float = MAX_INK_FRACTION,
        marker_check: bool = True,
        stain_known_key: str = STAIN_KNOWN_KEY,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if int(min_size) < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        if min_tissue_fraction is None:
            min_tissue_fraction = MIN_TISSUE_FRACTION
        for name, value in (("min_tissue_fraction", min_tissue_fraction), ("max_ink_fraction", max_ink_fraction)):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if isinstance(value, bool) or not 0.0 <= number <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        self.min_size = int(min_size)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.max_ink_fraction = float(max_ink_fraction)
        self.marker_check = bool(marker_check)
        self.stain_known_key = stain_known_key

    def check(self, image: Any, ihc: bool | None = False) -> InputCheck:
        """Run every check on one image.

        Args:
            image: RGB ``(H, W, 3)`` or ``(3, H, W)`` in ``[0, 255]``.
            ihc: the image is an IHC (``True``), an H&E (``False``) or of unknown stain (``None``: an eosin index
                below :data:`IHC_EOSIN_INDEX_BELOW` makes it an IHC).

        Returns:
            The :class:`InputCheck`; ``issues`` is empty when the image passed.
        """
        rgb = _hwc(image)
        height, width = rgb.shape[:2]
        if min(height, width) < self.min_size:
            return InputCheck(
                issues=[("no_tissue", f"image is {width}x{height} px, smaller than the {self.min_size} px minimum")]
            )
        if (rgb == rgb[0, 0]).all():
            return InputCheck(
                issues=[
                    ("no_tissue", "blank image (a single colour, e.g. empty or fully transparent): no stained tissue")
                ]
            )
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return InputCheck(
                issues=[("no_tissue", "greyscale image (equal colour channels): not a stained RGB patch")]
            )
        ink_maps = None
        if max(height, width) <= min(WORK_SIDE, TISSUE_SIDE):
            # Both checks would build the same working copy (the image itself) and the same maps: build them once.
            ink_maps = chroma_maps(working_copy(rgb, None), sigma=INK_SMOOTHING)
        tissue = tissue_mask(rgb, self.saturation_range, maps=ink_maps)
        ink = measure_ink(rgb, maps=ink_maps)
        ink_mask = _resized(ink.mask, tissue.shape)
        stained = int((tissue | ink_mask).sum())
        result = InputCheck(
            tissue=float((tissue & ~ink_mask).mean()),
            ink_fraction=float(ink_mask.sum() / stained) if stained else 0.0,
            ink=ink,
        )
        if result.ink_fraction > self.max_ink_fraction:
            kinds = " and ".join(ink.main_kinds) or "marker"
            result.issues.append(
                (
                    "pen_ink",
                    f"pen ink ({kinds}) covers {result.ink_fraction:.1%} of the stained area, more than the "
                    f"{self.max_ink_fraction:.1%} tolerated (ink is not tissue and changes the stain colours)",
                )
            )
        floor = min(NO_TISSUE_BELOW, self.min_tissue_fraction)
        if result.tissue < floor:
            result.issues.append(
                (
                    "no_tissue",
                    f"no stained tissue: {result.tissue:.1%} of the pixels are tissue, less than {floor:.0%} "
                    "(blank, background or transparent image)",
                )
            )
        elif result.tissue < self.min_tissue_fraction:
            result.issues.append(
                (
                    "insufficient_tissue",
                    f"too little tissue for a HER2 score: {result.tissue:.1%} of the image is stained tissue, at "
                    f"least {self.min_tissue_fraction:.1%} needed (a corner or sliver of tissue on glass)",
                )
            )
        if self.marker_check and not result.issues:
            if ihc is None:
                ihc = eosin_index(np.clip(rgb, 0, 255).astype(np.uint8)) < IHC_EOSIN_INDEX_BELOW
            if ihc:
                result.pattern = dab_pattern(rgb)
                if result.pattern.verdict:
                    result.issues.append(("wrong_marker", f"wrong marker: {result.pattern.describe()}"))
        return result

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        known = float(torch.as_tensor(d.get(self.stain_known_key, 1.0)).reshape(-1)[0]) > 0.5
        shares, issues, reasons = [], [], set()
        for key in self.keys:
            if d.get(key) is None:
                shares.append(-1.0)
                continue
            ihc = True if key == IHC_KEY else (False if known else None)
            result = self.check(d[key], ihc=ihc)
            shares.append(result.tissue)
            for code, sentence in result.issues:
                reasons.add(code)
                issues.append(f"{key}: {sentence}")
        d["tissue_fraction"] = torch.tensor(shares, dtype=torch.float32)
        d["tissue_ok"] = torch.tensor(0.0 if issues else 1.0)
        d["tissue_issue"] = "; ".join(issues)
        d["tissue_reasons"] = ",".join(code for code in INPUT_REFUSALS if code in reasons)
        return d
