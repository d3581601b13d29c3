"""Procedural, histology-like demo dataset of registered H&E / HER2-IHC pairs.

Every pair is rendered from one tissue layout (stroma, fat vacuoles, tumour cell nests with nuclei and membranes), so
the two stains are pixel-registered like BCI. Colours come from Beer-Lambert optical densities of real stain vectors
(hematoxylin, eosin, DAB; the vectors scikit-image uses for colour deconvolution), so colour-deconvolution tools treat
the renders like real slides.

Class signal follows the ASCO/CAP HER2 IHC scoring rules:

==========  ===========================================================================
score       IHC membrane staining of tumour cells
==========  ===========================================================================
``0``       none, or faint staining in fewer than 10% of cells
``1+``      faint, incomplete membrane staining in more than 10% of cells
``2+``      weak to moderate, complete membrane staining in more than 10% of cells
``3+``      strong, complete (circumferential) membrane staining in more than 10% of cells
==========  ===========================================================================

The H&E rendering carries a deliberately weaker, overlapping cue (tumour cellularity and nuclear size grow with the
score, with wide per-image noise), so H&E-only classification is harder than IHC, as in practice.

A "lab" parameter changes stain vectors, stain intensity, background tint, blur and JPEG quality, to simulate
another institution's staining and scanning for stain-normalisation and robustness checks.

**Slides** (optional, ``patches_per_slide > 1``): like BCI, whose patches carry the HER2 score of the slide they were
cut from, consecutive patches then come from one simulated slide. The patches of a slide share a
:class:`SlideStyle` (stain amounts and hues, background, tumour cellularity, nuclear size) and the slide's score;
with ``heterogeneity > 0`` a fraction of them is rendered with a neighbouring score (HER2 staining is heterogeneous
within a slide, and BCI labels are slide-level). Slide ``s`` holds the ids ``s*N ... s*N + N - 1`` (so
``--split_by id_block:N`` recovers the slides exactly), and ``slides.csv`` (columns ``id, slide, split, label,
rendered_label``) lists them for ``--split_by csv:PATH``. The default (one patch per slide) renders exactly what
earlier versions rendered.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from her2_monai.constants import CLASS_NAMES, NUM_CLASSES
from her2_monai.optical_density import intensity_from_optical_density

__all__ = [
    "MARKERS",
    "LAB_PROFILES",
    "LabProfile",
    "SlideStyle",
    "DemoPairGenerator",
    "generate_demo_dataset",
    "ensure_demo_dataset",
    "default_cache_dir",
    "preview_grid",
]

logger = logging.getLogger(__name__)

#: Bump when the rendering changes, so cached datasets are regenerated rather than silently reused.
DEMO_VERSION = 1

#: IHC markers the generator renders: ``"her2"`` (membrane DAB by the HER2 scoring rules, the dataset's IHC) and two
#: wrong markers for the input checks: ``"nuclear"`` (DAB filling tumour nuclei, as Ki67, ER or PR) and
#: ``"cytoplasmic"`` (DAB filling tumour cytoplasm, as FHL2 or cytokeratin).
MARKERS = ("her2", "nuclear", "cytoplasmic")

# Optical-density vectors (rows: hematoxylin, eosin, DAB) as used by scikit-image's ``rgb_from_hed``.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_DAB = np.array([0.27, 0.57, 0.78])


@dataclass(frozen=True)
class LabProfile:
    """Staining and scanning characteristics of one simulated institution.

    Args:
        he_tilt: rotation applied to the hematoxylin/eosin OD vectors (radians-like, small).
        dab_tilt: rotation applied to the DAB OD vector.
        he_intensity: multiplier on hematoxylin and eosin optical density in the H&E stain.
        ihc_intensity: multiplier on optical density in the IHC stain.
        background: RGB of the glass / empty areas (the light source seen through the slide).
        blur_sigma: Gaussian blur in pixels at 256 px, simulating scanner focus.
        jpeg_quality: JPEG re-encoding quality (``None``: no compression).
    """

    he_tilt: float = 0.0
    dab_tilt: float = 0.0
    he_intensity: float = 1.0
    ihc_intensity: float = 1.0
    background: tuple[int, int, int] = (244, 242, 246)
    blur_sigma: float = 0.5
    jpeg_quality: int | None = 90


#: Built-in institutions. "A" is the default training lab; "B" and "C" are shifted labs for robustness checks.
LAB_PROFILES: dict[str, LabProfile] = {
    "A": LabProfile(),
    "B": LabProfile(
        he_tilt=0.12,
        dab_tilt=-0.10,
        he_intensity=1.35,
        ihc_intensity=0.8,
        background=(238, 236, 228),
        blur_sigma=0.9,
        jpeg_quality=75,
    ),
    "C": LabProfile(
        he_tilt=-0.10,
        dab_tilt=0.12,
        he_intensity=0.75,
        ihc_intensity=1.25,
        background=(248, 246, 250),
        blur_sigma=0.3,
        jpeg_quality=95,
    ),
}


@dataclass(frozen=True)
class SlideStyle:
    """What the patches of one simulated slide share (on top of the lab): staining, background and morphology.

    Args:
        he_gain: multiplier on the H&E optical density.
        ihc_gain: multiplier on the IHC optical density.
        he_tilt: extra rotation of the hematoxylin/eosin OD vectors.
        dab_tilt: extra rotation of the DAB OD vector.
        background_shift: added to the RGB background (glass) colour.
        cellularity_shift: added to the tumour-nest area fraction.
        nuclear_scale: multiplier on the tumour nuclear size.
    """

    he_gain: float = 1.0
    ihc_gain: float = 1.0
    he_tilt: float = 0.0
    dab_tilt: float = 0.0
    background_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cellularity_shift: float = 0.0
    nuclear_scale: float = 1.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SlideStyle:
        """A random slide: stain amounts within about +-20%, hue tilts within +-0.08, background within +-6 levels,
        cellularity within +-0.06 and nuclear size within +-10% (of the same order as the lab-to-lab differences).

        Args:
            rng: the slide's random generator.

        Returns:
            The style.
        """
        return cls(
            he_gain=float(np.exp(rng.normal(0.0, 0.12))),
            ihc_gain=float(np.exp(rng.normal(0.0, 0.12))),
            he_tilt=float(rng.uniform(-0.08, 0.08)),
            dab_tilt=float(rng.uniform(-0.08, 0.08)),
            background_shift=tuple(float(v) for v in rng.uniform(-6.0, 6.0, 3)),
            cellularity_shift=float(rng.uniform(-0.06, 0.06)),
            nuclear_scale=float(np.exp(rng.normal(0.0, 0.06))),
        )


_NO_SLIDE = SlideStyle()

# Per-class IHC membrane parameters: (fraction of tumour cells stained, DAB OD of a stained membrane, completeness).
_MEMBRANE_RULES: dict[int, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    0: ((0.0, 0.08), (0.05, 0.12), (0.2, 0.5)),
    1: ((0.35, 0.8), (0.12, 0.22), (0.3, 0.6)),
    2: ((0.5, 0.9), (0.35, 0.55), (0.85, 1.0)),
    3: ((0.8, 1.0), (0.9, 1.3), (1.0, 1.0)),
}


def _tilt(vector: np.ndarray, angle: float, axis: np.ndarray) -> np.ndarray:
    """Rotate an OD vector by ``angle`` around ``axis`` (Rodrigues) and renormalise it."""
    axis = axis / np.linalg.norm(axis)
    rotated = (
        vector * np.cos(angle)
        + np.cross(axis, vector) * np.sin(angle)
        + axis * np.dot(axis, vector) * (1 - np.cos(angle))
    )
    rotated = np.abs(rotated)
    return rotated / np.linalg.norm(rotated)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    field -= field.min()
    return field / max(float(field.max()), 1e-8)


def _stable_seed(*parts: object) -> int:
    """A seed that is the same on every machine and Python run (unlike ``hash``)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


class DemoPairGenerator:
    """Render registered H&E / HER2-IHC patch pairs whose class follows the HER2 scoring rules.

    Args:
        image_size: side length of the square patches in pixels. Structures are sized relative to 256 px.
        lab: a key of :data:`LAB_PROFILES` or a :class:`LabProfile`.

    Raises:
        ValueError: if ``lab`` is unknown or ``image_size`` is below 32.

    Example::

        gen = DemoPairGenerator(image_size=128)
        he, ihc = gen.render(label=3, seed=7)  # uint8 (128, 128, 3) each
    """

    def __init__(self, image_size: int = 256, lab: str | LabProfile = "A") -> None:
        if int(image_size) < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
        if isinstance(lab, str):
            if lab not in LAB_PROFILES:
                raise ValueError(f"unknown lab '{lab}'; expected one of {sorted(LAB_PROFILES)}")
            self.lab_name, self.profile = lab, LAB_PROFILES[lab]
        else:
            self.lab_name, self.profile = "custom", lab
        self.image_size = int(image_size)
        self.scale = self.image_size / 256.0
        p = self.profile
        self.h_vec = _tilt(_H, p.he_tilt, np.array([0.0, 0.0, 1.0]))
        self.e_vec = _tilt(_E, p.he_tilt, np.array([1.0, 0.0, 0.0]))
        self.dab_vec = _tilt(_DAB, p.dab_tilt, np.array([0.0, 1.0, 0.0]))

    # ------------------------------------------------------------------ layout
    def _layout(self, rng: np.random.Generator, label: int, slide: SlideStyle = _NO_SLIDE) -> dict[str, np.ndarray]:
        """Tissue geometry shared by both stains: stroma, fat, tumour nests, cells, nuclei, membranes."""
        n, s = self.image_size, self.scale
        shape = (n, n)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)

        # Fibrous stroma: anisotropic noise gives collagen-like streaks in a random direction.
        direction = rng.uniform(0, np.pi)
        fibres = _smooth_noise(rng, shape, sigma=(1.0 * s + 0.5, 6.0 * s + 0.5))
        fibres = ndimage.rotate(fibres, np.degrees(direction), reshape=False, mode="reflect")
        stroma = 0.35 + 0.65 * fibres * _smooth_noise(rng, shape, sigma=20 * s)

        # Fat vacuoles: clustered empty circles with thin septa.
        fat = np.zeros(shape, bool)
        fat_region = _smooth_noise(rng, shape, sigma=40 * s) > rng.uniform(0.55, 0.9)
        for _ in range(int(rng.integers(10, 40))):
            cy, cx = rng.uniform(0, n, 2)
            if not fat_region[int(cy), int(cx)]:
                continue
            r = rng.uniform(8, 22) * s
            fat |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2

        # Tumour nests: blobs whose area grows (weakly) with the score — the H&E cue.
        cellularity = np.clip(0.18 + 0.05 * label + rng.normal(0, 0.08) + slide.cellularity_shift, 0.08, 0.6)
        nest_field = _smooth_noise(rng, shape, sigma=14 * s)
        nests = nest_field > np.quantile(nest_field, 1 - cellularity)
        nests &= ~fat

        # Cells: Voronoi partition of random seeds inside nests; membranes are the partition boundaries.
        cell_radius = 5.5 * s * rng.uniform(0.9, 1.1)
        n_seeds = int(nests.sum() / (np.pi * cell_radius**2)) + 1
        ys, xs = np.nonzero(nests)
        seeds = np.zeros(shape, np.int32)
        if len(ys):
            idx = rng.choice(len(ys), size=min(n_seeds, len(ys)), replace=False)
            seeds[ys[idx], xs[idx]] = np.arange(1, len(idx) + 1)
        cells = np.zeros(shape, np.int32)
        if seeds.any():
            _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            cells = np.where(nests, seeds[iy, ix], 0)
        grad = np.abs(np.diff(cells, axis=0, prepend=cells[:1])) + np.abs(np.diff(cells, axis=1, prepend=cells[:, :1]))
        membrane = (grad > 0) & (cells > 0)
        membrane = ndimage.binary_dilation(membrane, iterations=max(1, int(round(0.6 * s))))
        membrane |= ndimage.binary_dilation(nests, iterations=1) & ~nests  # nest border is a membrane too

        # Nuclei: an ellipse at each tumour cell centre (size grows weakly with score), plus sparse stromal nuclei.
        nuc_scale = np.clip((1.0 + 0.08 * label + rng.normal(0, 0.1)) * slide.nuclear_scale, 0.7, 1.6)
        nuclei = np.zeros(shape, np.float32)
        centres = np.argwhere(seeds > 0)
        n_stromal = int(rng.integers(30, 70) * s * s)
        stromal = np.column_stack([rng.uniform(0, n, n_stromal), rng.uniform(0, n, n_stromal)])
        for (cy, cx), radius, elong in [(c, 2.6 * s * nuc_scale, 1.3) for c in centres] + [
            (c, 1.6 * s, 2.5) for c in stromal
        ]:
            a = radius * rng.uniform(0.85, 1.15)
            b = a / elong
            theta = rng.uniform(0, np.pi)
            y0, y1 = int(max(cy - a - 2, 0)), int(min(cy + a + 3, n))
            x0, x1 = int(max(cx - a - 2, 0)), int(min(cx + a + 3, n))
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
            nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], inside * rng.uniform(0.7, 1.0))
        nuclei[fat] = 0
        chromatin = 0.75 + 0.25 * _smooth_noise(rng, shape, sigma=0.7 * s + 0.3)
        return {
            "stroma": stroma.astype(np.float32),
            "fat": fat,
            "nests": nests,
            "cells": cells,
            "membrane": membrane,
            "nuclei": nuclei * chromatin,
        }

    # ------------------------------------------------------------------ staining
    def _membrane_dab(self, rng: np.random.Generator, label: int, layout: dict[str, np.ndarray]) -> np.ndarray:
        """DAB optical density on tumour-cell membranes following the HER2 scoring rules of ``label``."""
        (f_lo, f_hi), (i_lo, i_hi), (c_lo, c_hi) = _MEMBRANE_RULES[label]
        cells, membrane = layout["cells"], layout["membrane"]
        n_cells = int(cells.max())
        if n_cells == 0:
            return np.zeros(cells.shape, np.float32)
        # Per-cell: stained or not, and its intensity; a membrane pixel takes the value of the cell it borders.
        stained = rng.uniform(size=n_cells + 1) < rng.uniform(f_lo, f_hi)
        stained[0] = False
        intensity = rng.uniform(i_lo, i_hi, size=n_cells + 1) * stained
        grown = ndimage.grey_dilation(cells, size=3)
        per_pixel = intensity[grown] * membrane
        # Incomplete staining: break membranes with a low-frequency gate (fraction kept = completeness).
        completeness = rng.uniform(c_lo, c_hi)
        if completeness < 1.0:
            gate = _smooth_noise(rng, cells.shape, sigma=2.0 * self.scale + 0.5)
            per_pixel *= gate < np.quantile(gate, completeness)
        # Faint cytoplasmic blush in strongly positive cases.
        blush = 0.08 * (label >= 2) * (cells > 0) * intensity[cells]
        return (per_pixel + blush).astype(np.float32)

    def _wrong_marker_dab(
        self, rng: np.random.Generator, strength: int, layout: dict[str, np.ndarray], marker: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """DAB optical density of a non-HER2 marker, and the factor on the hematoxylin counterstain.

        ``"nuclear"`` (Ki67, ER, PR): DAB fills the nuclei of a share of tumour cells, whose blue counterstain it
        hides. ``"cytoplasmic"``: DAB fills the cytoplasm (cell minus nucleus) of a share of tumour cells, membranes
        no darker than the rest. ``strength`` (0..3) sets the share of positive cells and the DAB density.
        """
        cells, nuclei = layout["cells"], layout["nuclei"]
        n_cells = int(cells.max())
        ones = np.ones(cells.shape, np.float32)
        if n_cells == 0:
            return np.zeros(cells.shape, np.float32), ones
        share = rng.uniform(0.3, 0.6) + 0.1 * strength
        positive = rng.uniform(size=n_cells + 1) < share
        positive[0] = False
        intensity = rng.uniform(0.25, 0.45, size=n_cells + 1) * (1.0 + 0.6 * strength) * positive
        if marker == "nuclear":
            # A nucleus belongs to the cell it sits in (tumour nuclei are at the cell seeds).
            nucleus = nuclei > 0.2
            dab = intensity[cells] * nuclei * nucleus
            counter = np.where(nucleus & positive[cells], 0.3, 1.0).astype(np.float32)
            return dab.astype(np.float32), counter
        cytoplasm = (cells > 0) & (nuclei < 0.2)
        texture = 0.8 + 0.4 * _smooth_noise(rng, cells.shape, sigma=1.5 * self.scale + 0.5)
        dab = intensity[cells] * cytoplasm * texture
        return dab.astype(np.float32), ones

    def _to_rgb(self, od: np.ndarray, rng: np.random.Generator, slide: SlideStyle = _NO_SLIDE) -> np.ndarray:
        """Beer-Lambert: optical density (H, W, 3) -> uint8 RGB, then scanner blur and JPEG re-encoding."""
        background = np.asarray(self.profile.background, np.float32)
        if slide.background_shift != _NO_SLIDE.background_shift:
            background = np.clip(background + np.asarray(slide.background_shift, np.float32), 0, 255)
        rgb = intensity_from_optical_density(od * np.log(10.0), background)  # the rendering's OD is decadic
        sigma = self.profile.blur_sigma * self.scale
        if sigma > 0:
            rgb = ndimage.gaussian_filter(rgb, sigma=(sigma, sigma, 0))
        rgb += rng.normal(0, 2.0, rgb.shape)  # sensor noise
        img = np.clip(rgb, 0, 255).astype(np.uint8)
        if self.profile.jpeg_quality is not None:
            buffer = io.BytesIO()
            Image.fromarray(img).save(buffer, format="JPEG", quality=self.profile.jpeg_quality)
            img = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        return img

    def render(
        self, label: int, seed: int, slide: SlideStyle | None = None, marker: str = "her2"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Render one registered pair.

        Args:
            label: HER2 class index ``0..3`` (``CLASS_NAMES[label]``); for a wrong ``marker``, the staining strength
                (0 weakest, 3 strongest) and the H&E cue.
            seed: any integer; the same ``(label, seed, lab, image_size, slide, marker)`` always gives the same
                pixels.
            slide: the style of the slide the patch comes from (``None``: no slide effect).
            marker: one of :data:`MARKERS`; ``"her2"`` (the default) renders the dataset's HER2 IHC, the others an
                IHC of another marker (nuclear or cytoplasmic DAB), which must never get a HER2 score; the tissue
                layout (stroma, cells, nuclei) is the same for every marker.

        Returns:
            ``(he, ihc)``: uint8 RGB arrays of shape ``(H, W, 3)``.

        Raises:
            ValueError: if ``label`` is not in ``0..3`` or ``marker`` is unknown.
        """
        if int(label) not in range(NUM_CLASSES):
            raise ValueError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
        if marker not in MARKERS:
            raise ValueError(f"marker must be one of {list(MARKERS)}, got {marker!r}")
        label = int(label)
        rng = np.random.default_rng(
            _stable_seed("her2-demo", DEMO_VERSION, label, seed, self.lab_name, self.image_size)
        )
        slide = slide or _NO_SLIDE
        layout = self._layout(rng, label, slide)
        stroma, fat, nests, nuclei = layout["stroma"], layout["fat"], layout["nests"], layout["nuclei"]
        tissue = (~fat).astype(np.float32)
        # Per-patch staining variation on top of the lab profile (and of the slide, if any).
        he_gain = self.profile.he_intensity * rng.uniform(0.85, 1.15) * slide.he_gain
        ihc_gain = self.profile.ihc_intensity * rng.uniform(0.85, 1.15) * slide.ihc_gain
        h_vec, e_vec, dab_vec = self.h_vec, self.e_vec, self.dab_vec
        if slide.he_tilt:
            h_vec = _tilt(h_vec, slide.he_tilt, np.array([0.0, 0.0, 1.0]))
            e_vec = _tilt(e_vec, slide.he_tilt, np.array([1.0, 0.0, 0.0]))
        if slide.dab_tilt:
            dab_vec = _tilt(dab_vec, slide.dab_tilt, np.array([0.0, 1.0, 0.0]))

        # H&E: eosin on stroma and tumour cytoplasm, hematoxylin on nuclei (darker in H&E than as IHC counterstain).
        eosin = tissue * (0.17 * stroma + 0.10 * nests) + 0.04 * nuclei
        hema = 1.0 * nuclei + tissue * (0.03 * stroma + 0.07 * nests)
        od_he = he_gain * (hema[..., None] * h_vec + eosin[..., None] * e_vec)

        # IHC: pale hematoxylin counterstain, faint stromal background, DAB on membranes by the scoring rules.
        counter = 0.45 * nuclei + tissue * (0.07 * stroma + 0.03 * nests)
        if marker == "her2":
            dab = self._membrane_dab(rng, label, layout) + 0.015 * tissue * stroma
        else:
            marker_dab, counter_scale = self._wrong_marker_dab(rng, label, layout, marker)
            dab = marker_dab + 0.015 * tissue * stroma
            counter = counter * counter_scale
        od_ihc = ihc_gain * (counter[..., None] * h_vec + dab[..., None] * dab_vec)
        return self._to_rgb(od_he, rng, slide), self._to_rgb(od_ihc, rng, slide)


def default_cache_dir() -> Path:
    """Folder where demo datasets are cached: ``$HER2_MONAI_CACHE`` or ``~/.cache/her2_monai``."""
    return Path(os.environ.get("HER2_MONAI_CACHE", Path.home() / ".cache" / "her2_monai"))


def _split_counts(n_per_class: int, n_test_per_class: int | None) -> dict[str, int]:
    test = max(1, n_per_class // 4) if n_test_per_class is None else int(n_test_per_class)
    return {"train": int(n_per_class), "test": test}


def generate_demo_dataset(
    output_dir: str | os.PathLike,
    n_per_class: int = 48,
    image_size: int = 256,
    lab: str = "A",
    seed: int = 0,
    n_test_per_class: int | None = None,
    patches_per_slide: int = 1,
    heterogeneity: float = 0.0,
) -> dict[str, dict[str, int]]:
    """Write a demo dataset in the BCI layout: ``{HE,IHC}/{train,test}/NNNNN_{split}_{score}.png``.

    The folder is built in a temporary sibling and renamed into place when complete, so an interrupted run never leaves
    a half-written dataset behind.

    Args:
        output_dir: destination folder; must not exist or be empty.
        n_per_class: training pairs per class.
        image_size: patch side length in pixels.
        lab: simulated institution (:data:`LAB_PROFILES`).
        seed: base seed; the dataset is a pure function of all arguments.
        n_test_per_class: test pairs per class (default ``max(1, n_per_class // 4)``).
        patches_per_slide: consecutive patches of one class that come from one simulated slide (see the module
            docstring); with more than one, ``slides.csv`` is written too. 1: every patch is independent.
        heterogeneity: fraction of a slide's patches rendered with a neighbouring score (the file keeps the slide's).

    Returns:
        Counts ``{split: {score: n}}``.

    Raises:
        FileExistsError: if ``output_dir`` exists and is not empty.
        ValueError: on a bad count, size, lab, slide size or heterogeneity.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    if int(patches_per_slide) < 1:
        raise ValueError(f"patches_per_slide must be at least 1, got {patches_per_slide}")
    if not 0.0 <= float(heterogeneity) < 1.0:
        raise ValueError(f"heterogeneity must be in [0, 1), got {heterogeneity}")
    per_slide = int(patches_per_slide)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"demo output folder '{output_dir}' exists and is not empty")
    generator = DemoPairGenerator(image_size=image_size, lab=lab)
    counts: dict[str, dict[str, int]] = {}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        index = 0
        slide_rows: list[tuple[str, str, str, str, str]] = []
        for split, n_split in _split_counts(n_per_class, n_test_per_class).items():
            counts[split] = {}
            for stain in ("HE", "IHC"):
                (staging / stain / split).mkdir(parents=True)
            for label, score in enumerate(CLASS_NAMES):
                for start in range(0, n_split, per_slide):
                    # Slide s holds the ids s*N ... s*N + N - 1 (no gap when N = 1: the historical numbering).
                    index = -(-(index + 1) // per_slide) * per_slide - 1
                    slide_no = (index + 1) // per_slide
                    style = None
                    if per_slide > 1:
                        style = SlideStyle.draw(np.random.default_rng(_stable_seed(seed, "slide", slide_no)))
                    for _ in range(min(per_slide, n_split - start)):
                        index += 1
                        shown = label
                        if heterogeneity:
                            patch_rng = np.random.default_rng(_stable_seed(seed, "heterogeneity", index))
                            if patch_rng.uniform() < heterogeneity:
                                step = int(patch_rng.choice([-1, 1]))
                                shown = label + step if 0 <= label + step < NUM_CLASSES else label - step
                        he, ihc = generator.render(shown, seed=_stable_seed(seed, split, index), slide=style)
                        name = f"{index:05d}_{split}_{score}.png"
                        Image.fromarray(he).save(staging / "HE" / split / name)
                        Image.fromarray(ihc).save(staging / "IHC" / split / name)
                        slide_rows.append((Path(name).stem, f"slide{slide_no:04d}", split, score, CLASS_NAMES[shown]))
                counts[split][score] = n_split
        meta = {"version": DEMO_VERSION, "n_per_class": n_per_class, "image_size": image_size, "lab": lab}
        meta.update({"seed": seed, "counts": counts})
        if per_slide > 1 or heterogeneity:
            meta.update({"patches_per_slide": per_slide, "heterogeneity": float(heterogeneity)})
            with open(staging / "slides.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("id", "slide", "split", "label", "rendered_label"))
                writer.writerows(slide_rows)
        (staging / "demo.json").write_text(json.dumps(meta, indent=2))
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def ensure_demo_dataset(
    cache_dir: str | os.PathLike | None = None,
    n_per_class: int = 48,
    image_size: int = 256,
    lab: str = "A",
    seed: int = 0,
    n_test_per_class: int | None = None,
    patches_per_slide: int = 1,
    heterogeneity: float = 0.0,
) -> Path:
    """Return the folder of a cached demo dataset with these settings, generating it on first use.

    Args:
        cache_dir: parent folder of cached datasets (default :func:`default_cache_dir`).
        n_per_class, image_size, lab, seed, n_test_per_class, patches_per_slide, heterogeneity: as in
            :func:`generate_demo_dataset`.

    Returns:
        The dataset folder (BCI layout).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = f"demo_v{DEMO_VERSION}_lab{lab}_n{n_per_class}_t{n_test_per_class}_s{image_size}_seed{seed}"
    if patches_per_slide != 1 or heterogeneity:
        tag += f"_slides{patches_per_slide}_het{heterogeneity:g}"
    folder = root / tag
    if (folder / "demo.json").is_file():
        return folder
    logger.info("generating the demo dataset into %s (first use; later runs reuse it)", folder)
    if folder.exists():  # a leftover without demo.json cannot be trusted
        shutil.rmtree(folder)
    generate_demo_dataset(
        folder, n_per_class, image_size, lab, seed, n_test_per_class, patches_per_slide, heterogeneity
    )
    return folder


def preview_grid(
    generator: DemoPairGenerator, per_class: int = 2, seed: int = 0, tile: int | None = None
) -> np.ndarray:
    """Compose a contact sheet: one row per class, each row ``per_class`` (H&E, IHC) pairs side by side.

    Returns:
        uint8 RGB array ``(NUM_CLASSES * tile, 2 * per_class * tile, 3)``.
    """
    tile = tile or generator.image_size
    rows = []
    for label in range(NUM_CLASSES):
        row = []
        for k in range(per_class):
            for img in generator.render(label, seed=_stable_seed(seed, "preview", k)):
                row.append(np.asarray(Image.fromarray(img).resize((tile, tile))))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)
