"""Colour deconvolution of histology images: optical density, stain concentrations, stain statistics, stain jitter.

Hematoxylin, eosin and DAB absorb light by the Beer-Lambert law, so an image's optical density ``OD = -ln(I / I0)``
is a linear mix of the three stains' OD vectors (Ruifrok & Johnston 2001). Projecting OD on the inverse of the stain
matrix gives per-pixel concentrations. This module holds everything built on that, once:

* :class:`StainFeatureExtractor`: in-graph (traceable) optical density, concentrations and pooled stain statistics,
  used by the branch selector and by the H&E/IHC ordering of side-by-side pair images (:func:`order_he_ihc`);
* :func:`jitter_optical_density`: the affine OD-space stain jitter behind the training augmentations
  (:class:`~her2_monai.transforms.augment.RandStainJitterd`), and :func:`lab_appearance`, the branch selector's
  simulation of other labs' staining and scanning built on it.

Eosin absorbs green far more than blue and DAB the other way round, which is why the *eosin index* (OD-weighted
``(OD_green - OD_blue) / OD_total``) separates H&E from HER2-IHC whatever the lab's stain intensity.

The branch selector's physical cue is the *stain evidence* (:meth:`StainFeatureExtractor.evidence_features`,
:func:`evidence_logit`): H&E has eosin and no DAB, IHC has DAB and no eosin, and hematoxylin is in both. Each tissue
pixel's chroma (its OD off the grey axis) votes for the stain whose hue arc it lies in; grey pixels have no chroma
and no vote, and pen ink (hues no stain makes, or far more saturated than any stain) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from her2_monai.optical_density import intensity_from_optical_density, optical_density

__all__ = [
    "RUIFROK_HED_VECTORS",
    "STAIN_FEATURE_SETS",
    "EOSIN_INDEX",
    "TISSUE_INDEX",
    "HUE_BINS",
    "SATURATION_INDEX",
    "STAIN_ARCS",
    "INK_ARC",
    "INK_CHROMA",
    "EVIDENCE_COLUMNS",
    "StainFeatureExtractor",
    "evidence_logit",
    "jitter_optical_density",
    "lab_appearance",
    "eosin_index",
    "order_he_ihc",
]

#: Optical-density vectors of hematoxylin, eosin and DAB (Ruifrok & Johnston 2001), the rows of scikit-image's
#: ``rgb_from_hed`` before normalisation.
RUIFROK_HED_VECTORS: tuple[tuple[float, float, float], ...] = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)

#: Column of the eosin index in :class:`StainFeatureExtractor` outputs.
EOSIN_INDEX = 12

#: Column of the tissue fraction in :class:`StainFeatureExtractor` outputs.
TISSUE_INDEX = 13

#: Number of hue bins of the chroma-plane histogram (columns 14 to ``14 + HUE_BINS - 1``), 30 degrees each.
HUE_BINS = 12

#: Column of the chroma saturation (mean chroma magnitude per unit of total OD on tissue).
SATURATION_INDEX = 14 + HUE_BINS

#: Named subsets of :class:`StainFeatureExtractor` outputs. ``"invariant"``: the stain proportions and the eosin
#: index, which do not change with stain intensity, tissue amount or illumination (what differs most between labs);
#: ``"eosin"``: only the eosin proportion and eosin index -- eosin is what H&E always has and IHC never has, whereas
#: DAB is absent from HER2-0 IHC and hematoxylin is in both; ``"hue"``: the stain-hue histogram and the chroma
#: saturation, which grey (glass, shading, fat) does not move, unlike the deconvolution; ``"hue_eosin"``: both;
#: ``"all"``: every statistic.
STAIN_FEATURE_SETS: dict[str, tuple[int, ...]] = {
    "eosin": (7, EOSIN_INDEX),
    "invariant": (6, 7, 8, EOSIN_INDEX),
    "hue": (*range(14, 14 + HUE_BINS), SATURATION_INDEX),
    "hue_eosin": (7, EOSIN_INDEX, *range(14, 14 + HUE_BINS), SATURATION_INDEX),
    "all": tuple(range(15 + HUE_BINS)),
}


#: Concentration of the von Mises kernel of the hue histogram (about 15 degrees wide, half a bin).
_HUE_KAPPA = 1.0 / math.radians(15.0) ** 2

#: Hue arcs (degrees in the chroma plane, from the hematoxylin vector's projection) where each stain's chroma lies,
#: for the stain evidence. Ruifrok's vectors project at 0 (hematoxylin), 56 (eosin) and 138 (DAB); real stains spread
#: around them: a blued IHC counterstain to -30, an H&E nucleus (hematoxylin under eosin) to 30, magenta eosin and red
#: blood cells to about 105, brown DAB from about 115 to 175. The arcs meet halfway between those ranges and together
#: cover -45 to 200 degrees; the rest is :data:`INK_ARC`.
STAIN_ARCS: dict[str, tuple[float, float]] = {
    "hematoxylin": (-45.0, 30.0),
    "eosin": (30.0, 110.0),
    "dab": (110.0, 200.0),
}

#: Hues no stain mixture makes (green and blue-green: light passing green, which all three stains absorb): pen ink.
INK_ARC: tuple[float, float] = (-160.0, -45.0)

#: Chroma (OD) above which a pixel in :data:`_SATURATED_INK_ARCS` is blue or red pen ink: stained nuclei stay below
#: about 0.45, eosin and blood reach it only in specks (``her2_monai.transforms.ink`` uses the same threshold, with
#: morphology on top). The red arc stops short of DAB's (dense HER2 3+ membranes are as saturated as ink).
INK_CHROMA = 0.6
_SATURATED_INK_ARCS: tuple[tuple[float, float], ...] = ((-45.0, 15.0), (80.0, 110.0))
#: Chroma (OD) a pixel needs before its hue counts as ink (a near-grey pixel's hue is noise).
_INK_MIN_CHROMA = 0.08
#: Half-width (pixels) of the neighbourhood of :meth:`StainFeatureExtractor.ink_map` and the share of it that must be
#: ink by colour for the whole neighbourhood to count as ink.
INK_HALO = 2
INK_DENSITY = 0.25

#: Width (degrees) of the soft edge of every arc, and (OD) of the chroma threshold's edge: the features change
#: smoothly with the colour, so fp32 and bf16 give the same call.
_ARC_EDGE = 5.0
_CHROMA_EDGE = 0.05

#: Columns of :meth:`StainFeatureExtractor.evidence_features`.
EVIDENCE_COLUMNS: tuple[str, ...] = (
    *(f"hue_{k * 360 // HUE_BINS}" for k in range(HUE_BINS)),
    "saturation",
    "hematoxylin",
    "eosin",
    "dab",
    "ink",
)

#: Weight of the hematoxylin share on the IHC side of :func:`evidence_logit`, and the pseudo-share of every term.
EVIDENCE_HEMATOXYLIN = 0.25
EVIDENCE_EPS = 0.05


def _arc_membership(theta: Tensor, arc: tuple[float, float]) -> Tensor:
    """Soft membership (0 to 1) of hue angles ``theta`` (radians) in ``arc`` (degrees, low to high)."""
    centre = math.radians(0.5 * (arc[0] + arc[1]))
    half = math.radians(0.5 * (arc[1] - arc[0]))
    distance = torch.atan2(torch.sin(theta - centre), torch.cos(theta - centre)).abs()
    return torch.sigmoid((half - distance) / math.radians(_ARC_EDGE))


def evidence_logit(
    evidence: Tensor, hematoxylin_weight: float = EVIDENCE_HEMATOXYLIN, eps: float = EVIDENCE_EPS
) -> Tensor:
    """The physical rule of the branch selector: log-odds of IHC from the stain evidence.

    ``log(dab + w * hematoxylin + eps) - log(eosin + eps)`` on the chroma shares of
    :meth:`StainFeatureExtractor.evidence_features`. Eosin is evidence of H&E, DAB of IHC; hematoxylin alone (a HER2-0
    IHC has no DAB) counts a quarter for IHC, so an H&E needs at least a quarter as much eosin chroma as hematoxylin
    chroma -- every H&E section has eosin-stained cytoplasm and stroma, and even a dense, hematoxylin-rich field
    keeps that much. With no stain chroma at all the rule says 0 (no opinion).

    Args:
        evidence: ``(B, len(EVIDENCE_COLUMNS))`` from :meth:`StainFeatureExtractor.evidence_features`.
        hematoxylin_weight: weight of the hematoxylin share on the IHC side.
        eps: pseudo-share added to both sides (bounds the log-odds at about ``+-3``).

    Returns:
        ``(B,)`` log-odds of IHC over H&E.
    """
    h, e, d = (evidence[:, EVIDENCE_COLUMNS.index(k)] for k in ("hematoxylin", "eosin", "dab"))
    return torch.log(d + hematoxylin_weight * h + eps) - torch.log(e + eps)


class StainFeatureExtractor(nn.Module):
    """Per-image stain statistics from colour deconvolution, computed in the graph (traceable, no numpy).

    Steps: map ``[-1, 1]`` to RGB transmission in ``(0, 1]``; optionally divide by the image's own white point (the
    brightest locally averaged value per channel) so the grey or yellowish glass of another scanner reads as zero
    optical density; ``OD = -ln(max(rgb, eps))``; stain concentrations by projecting OD on the inverse of the
    normalised hematoxylin/eosin/DAB matrix, as scikit-image's ``rgb2hed`` does (but unclipped, since a negative eosin
    concentration is itself evidence of DAB). Pooled into ``num_features`` numbers:

    ========  ===========================================================================================
    index     feature
    ========  ===========================================================================================
    0-2       mean concentration of H, E, DAB
    3-5       standard deviation of each concentration
    6-8       concentration per unit total OD, OD-weighted (a stain *proportion*, independent of intensity)
    9-11      mean OD of the R, G, B channels
    12        eosin index: OD-weighted mean of ``(OD_green - OD_blue) / OD_total`` (pink vs brown)
    13        tissue fraction: share of pixels whose total OD exceeds ``tissue_od``
    14-25     hue histogram: each tissue pixel's OD projected on the chroma plane (orthogonal to the grey
              direction ``(1, 1, 1)``), its angle from the hematoxylin vector's projection soft-binned into
              :data:`HUE_BINS` bins of 30 degrees, weighted by its chroma magnitude; sums to 1. Eosin projects
              at about 56 degrees and DAB at about 138; grey (shading, grey glass, fat) has no chroma and no weight
    26        chroma saturation: chroma magnitude per unit of total OD over tissue (how much the hue can be trusted)
    ========  ===========================================================================================

    Args:
        stain_vectors: three RGB optical-density vectors (hematoxylin, eosin, DAB); normalised internally.
        eps: smallest transmission, bounding OD at ``-ln(eps)``.
        white_balance: divide by the estimated white point before taking OD.
        white_pool: side of the average-pooling window used to estimate the white point robustly to noise (inputs
            must be at least this large).
        tissue_od: total-OD threshold that marks a pixel as tissue.
        chroma_floor: chroma magnitude (OD units) subtracted from every pixel's before it votes in the hue histogram,
            so the faint tint of glass and fat and JPEG colour noise do not vote.

    Raises:
        ValueError: if ``stain_vectors`` is not a non-singular 3x3 matrix or a parameter is out of range.
    """

    num_features: int = 15 + HUE_BINS

    def __init__(
        self,
        stain_vectors: Sequence[Sequence[float]] = RUIFROK_HED_VECTORS,
        eps: float = 1.0 / 255.0,
        white_balance: bool = True,
        white_pool: int = 4,
        tissue_od: float = 0.15,
        chroma_floor: float = 0.05,
    ) -> None:
        super().__init__()
        vectors = torch.as_tensor(stain_vectors, dtype=torch.float64)
        if vectors.shape != (3, 3):
            raise ValueError(
                f"stain_vectors must be 3 RGB vectors (H, E, DAB), shape (3, 3); got {tuple(vectors.shape)}"
            )
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if abs(float(torch.linalg.det(vectors))) < 1e-6:
            raise ValueError(
                "stain_vectors are linearly dependent; colour deconvolution needs three independent vectors"
            )
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if white_pool < 1:
            raise ValueError(f"white_pool must be at least 1, got {white_pool}")
        if chroma_floor < 0:
            raise ValueError(f"chroma_floor must be non-negative, got {chroma_floor}")
        self.eps = float(eps)
        self.white_balance = bool(white_balance)
        self.white_pool = int(white_pool)
        self.tissue_od = float(tissue_od)
        self.chroma_floor = float(chroma_floor)
        # Orthonormal basis of the chroma plane (orthogonal to grey), u along the hematoxylin vector's projection.
        neutral = torch.full((3,), 1.0 / math.sqrt(3.0), dtype=torch.float64)
        u = vectors[0] - (vectors[0] @ neutral) * neutral
        u = u / u.norm().clamp_min(1e-12)
        self.register_buffer(
            "chroma_basis", torch.stack([u, torch.linalg.cross(neutral, u)], dim=1).to(torch.float32), persistent=False
        )
        centres = torch.arange(HUE_BINS, dtype=torch.float32) * (2 * math.pi / HUE_BINS)
        self.register_buffer("hue_centres", centres.view(1, -1, 1, 1), persistent=False)
        # od (row vector over RGB) @ stains_from_od = concentrations (H, E, DAB)
        self.register_buffer("stains_from_od", torch.linalg.inv(vectors).to(torch.float32), persistent=False)
        self.register_buffer("od_from_stains", vectors.to(torch.float32), persistent=False)

    def optical_density(self, x: Tensor) -> Tensor:
        """Optical density of an image batch.

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B, 3, H, W)`` non-negative optical density per RGB channel.
        """
        rgb = ((x.float() + 1.0) * 0.5).clamp(self.eps, 1.0)
        if self.white_balance:
            white = F.avg_pool2d(rgb, self.white_pool).amax(dim=(2, 3), keepdim=True)
            # A floor keeps an all-dark crop (no glass in view) from being stretched into a bright one.
            return optical_density(rgb, white.clamp_min(0.25), floor=self.eps)
        return optical_density(rgb, 1.0, floor=self.eps)

    def concentrations(self, od: Tensor) -> Tensor:
        """Project optical density on the stain vectors.

        Args:
            od: ``(B, 3, H, W)`` optical density.

        Returns:
            ``(B, 3, H, W)`` hematoxylin, eosin and DAB concentrations (unclipped).
        """
        return torch.einsum("bchw,cs->bshw", od, self.stains_from_od)

    def forward(self, x: Tensor) -> Tensor:
        """Compute the features.

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B, num_features)`` stain statistics.
        """
        return self.pool_features(self.optical_density(x))

    def pool_features(self, od: Tensor, hue: bool = True) -> Tensor:
        """Pool the statistics from an optical-density batch (lets callers reuse an OD they already computed).

        Args:
            od: ``(B, 3, H, W)`` from :meth:`optical_density`.
            hue: also compute the hue histogram and saturation (columns 14 on), most of the cost; callers that read
                only the first 14 columns skip it.

        Returns:
            ``(B, num_features)`` stain statistics, or ``(B, 14)`` without ``hue``.
        """
        conc = self.concentrations(od)
        total = od.sum(dim=1, keepdim=True)  # (B, 1, H, W)
        weight_sum = total.sum(dim=(2, 3)).clamp_min(1e-6)  # (B, 1)
        proportion = (conc * total).sum(dim=(2, 3)) / (total * total).sum(dim=(2, 3)).clamp_min(1e-6)
        eosin_ratio = (od[:, 1:2] - od[:, 2:3]) / total.clamp_min(1e-3)
        eosin_index = (eosin_ratio * total).sum(dim=(2, 3)) / weight_sum
        tissue_mask = (total > self.tissue_od).to(od.dtype)
        columns = [
            conc.mean(dim=(2, 3)),
            conc.std(dim=(2, 3)),
            proportion,
            od.mean(dim=(2, 3)),
            eosin_index,
            tissue_mask.mean(dim=(2, 3)),
        ]
        if hue:
            columns.extend(self.hue_histogram(od, total, tissue_mask))
        return torch.cat(columns, dim=1)

    def hue_histogram(self, od: Tensor, total: Tensor, tissue_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Chroma-weighted histogram of the stain hue over tissue, and the tissue's chroma saturation.

        Args:
            od: ``(B, 3, H, W)`` optical density.
            total: ``(B, 1, H, W)`` total optical density per pixel.
            tissue_mask: ``(B, 1, H, W)`` 1 on tissue, 0 on glass.

        Returns:
            ``(B, HUE_BINS)`` shares summing to 1 (uniform when there is no chroma at all), and ``(B, 1)`` mean chroma
            magnitude per unit of total OD over tissue.
        """
        chroma = torch.einsum("bchw,ck->bkhw", od, self.chroma_basis)  # (B, 2, H, W)
        radius = chroma.square().sum(dim=1, keepdim=True).clamp_min(1e-12).sqrt() * tissue_mask
        # Glass and fat carry a little chroma of no stain (a tinted white point, JPEG colour noise); only the chroma
        # above this floor votes for a hue.
        radius = (radius - self.chroma_floor).clamp_min(0.0)
        theta = torch.atan2(chroma[:, 1:2], chroma[:, 0:1])
        # Von Mises soft binning (neighbouring bins overlap), normalised per pixel so each pixel votes once.
        member = torch.exp(_HUE_KAPPA * (torch.cos(theta - self.hue_centres) - 1.0))
        member = member / member.sum(dim=1, keepdim=True)
        weight = radius.sum(dim=(2, 3))  # (B, 1)
        hue = ((member * radius).sum(dim=(2, 3)) + 1e-6 / HUE_BINS) / (weight + 1e-6)
        saturation = weight / (total * tissue_mask).sum(dim=(2, 3)).clamp_min(1e-6)
        return hue, saturation

    def ink_map(self, magnitude: Tensor, theta: Tensor) -> Tensor:
        """Where pen ink is, 0 to 1 per pixel, from each pixel's chroma magnitude and hue.

        A pixel is ink by colour when its hue is in :data:`INK_ARC` (with some chroma: grey pixels have a random hue)
        or when it is more saturated than :data:`INK_CHROMA` in the blue or red arcs. Ink lies on the coverslip over
        the tissue, so where it is thin the tissue's own colours mix with it (green over pink reads as hematoxylin
        blue): every pixel within :data:`INK_HALO` pixels of a neighbourhood that is at least
        :data:`INK_DENSITY` ink by colour is ink too (a linear ramp from 0.8 to 1.2 times that share).

        Args:
            magnitude: ``(B, 1, H, W)`` chroma magnitude (OD).
            theta: ``(B, 1, H, W)`` hue angle (radians).

        Returns:
            ``(B, 1, H, W)`` in ``[0, 1]``.
        """
        coloured = torch.sigmoid((magnitude - _INK_MIN_CHROMA) / (0.25 * _INK_MIN_CHROMA))
        saturated = torch.sigmoid((magnitude - INK_CHROMA) / _CHROMA_EDGE)
        bright_ink = sum(_arc_membership(theta, arc) for arc in _SATURATED_INK_ARCS).clamp(max=1.0)
        core = (coloured * _arc_membership(theta, INK_ARC) + saturated * bright_ink).clamp(max=1.0)
        window = 2 * INK_HALO + 1
        density = F.avg_pool2d(core, window, stride=1, padding=INK_HALO, count_include_pad=False)
        near = F.max_pool2d(density, window, stride=1, padding=INK_HALO)
        return torch.maximum(core, ((near - 0.8 * INK_DENSITY) / (0.4 * INK_DENSITY)).clamp(0.0, 1.0))

    def evidence_features(self, od: Tensor) -> Tensor:
        """Stain evidence: the hue histogram and the eosin, DAB and hematoxylin shares of the stain chroma, without ink.

        As in :meth:`hue_histogram`, each tissue pixel votes with its chroma above ``chroma_floor`` (grey pixels have
        none), but pen ink does not vote: hues in :data:`INK_ARC` (green, blue-green) and pixels more saturated than
        :data:`INK_CHROMA` in the hematoxylin-blue or red arcs. The remaining stain chroma is split by hue into the
        :data:`STAIN_ARCS`. Shares are ratios of chroma, so they do not depend on how much stain there is or how much
        of the view is tissue: in a dense, hematoxylin-rich field the decision rests on the little eosin or DAB there
        is.

        Args:
            od: ``(B, 3, H, W)`` from :meth:`optical_density`.

        Returns:
            ``(B, len(EVIDENCE_COLUMNS))``: the hue histogram of the stain chroma (:data:`HUE_BINS` shares summing
            to 1, uniform without chroma), its saturation (stain chroma per unit of total OD over tissue), the
            hematoxylin, eosin and DAB shares of the stain chroma (summing to 1, all 0 without chroma) and the share
            of the tissue area under ink.
        """
        total = od.sum(dim=1, keepdim=True)
        tissue_mask = (total > self.tissue_od).to(od.dtype)
        chroma = torch.einsum("bchw,ck->bkhw", od, self.chroma_basis)
        magnitude = chroma.square().sum(dim=1, keepdim=True).clamp_min(1e-12).sqrt()
        theta = torch.atan2(chroma[:, 1:2], chroma[:, 0:1])
        radius = (magnitude * tissue_mask - self.chroma_floor).clamp_min(0.0)
        ink = self.ink_map(magnitude, theta)
        stain = radius * (1.0 - ink)
        member = torch.exp(_HUE_KAPPA * (torch.cos(theta - self.hue_centres) - 1.0))
        member = member / member.sum(dim=1, keepdim=True)
        weight = stain.sum(dim=(2, 3))  # (B, 1)
        hue = ((member * stain).sum(dim=(2, 3)) + 1e-6 / HUE_BINS) / (weight + 1e-6)
        saturation = weight / (total * tissue_mask).sum(dim=(2, 3)).clamp_min(1e-6)
        arcs = torch.cat([(stain * _arc_membership(theta, arc)).sum(dim=(2, 3)) for arc in STAIN_ARCS.values()], 1)
        shares = arcs / (arcs.sum(dim=1, keepdim=True) + 1e-6)
        ink_share = (tissue_mask * ink).sum(dim=(2, 3)) / (tissue_mask.sum(dim=(2, 3)) + 1e-6)
        return torch.cat([hue, saturation, shares, ink_share], dim=1)


def jitter_optical_density(od: Tensor, od_map: Tensor, od_shift: Tensor) -> Tensor:
    """Apply a per-image affine map in optical-density space: ``od' = od @ od_map + od_shift``, kept non-negative.

    Scaling and shifting optical density (rather than intensity) changes how much stain there is while glass stays
    white. With ``od_map`` diagonal this scales each RGB channel's density; with
    ``inv(S) @ diag(alpha) @ S'`` it scales the hematoxylin/eosin/DAB concentrations and re-stains them with other
    stain vectors ``S'`` (Tellez et al.'s HED jitter plus a stain-hue change).

    Args:
        od: ``(B, 3, H, W)`` or ``(3, H, W)`` optical density.
        od_map: ``(B, 3, 3)`` or ``(3, 3)``, acting on the channel axis (row vector convention).
        od_shift: ``(B, 3)`` or ``(3,)``.

    Returns:
        Jittered optical density, same shape as ``od``, clamped at 0.
    """
    single = od.ndim == 3
    if single:
        od, od_map, od_shift = od[None], od_map[None], od_shift[None]
    out = torch.einsum("bchw,bcd->bdhw", od, od_map) + od_shift[:, :, None, None]
    out = out.clamp_min(0.0)
    return out[0] if single else out


_HED = torch.tensor(RUIFROK_HED_VECTORS, dtype=torch.float32)
_HED = _HED / _HED.norm(dim=1, keepdim=True)
_HED_INV = torch.linalg.inv(_HED)


#: Smallest factor on the stain concentrations of a faded image (:func:`lab_appearance`).
_FADE_MIN = 0.15


def _grey_rotation(angle: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` rotations about the grey axis ``(1, 1, 1)`` by ``angle`` (``(B, 1, 1)`` radians): a hue change."""
    eye = torch.eye(3)
    k = torch.full((3,), 1.0 / math.sqrt(3.0))
    k_cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return eye * torch.cos(angle) + k_cross * torch.sin(angle) + torch.outer(k, k) * (1 - torch.cos(angle))


def _uniform(gen: torch.Generator, n: int, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=gen)


def lab_appearance(
    rgb: torch.Tensor,
    generator: torch.Generator,
    strength: float = 1.0,
    fade_prob: float = 0.0,
    eosin_hue: Sequence[float] | None = None,
    hematoxylin_hue: Sequence[float] | None = None,
    dab_hue: Sequence[float] | None = None,
) -> torch.Tensor:
    """Simulate other labs' staining and scanning on a batch, keeping each image's stain identity.

    Per image, in this order: stain-space jitter (scale and shift of the hematoxylin, eosin and DAB concentrations,
    as in Tellez et al., and re-staining with slightly perturbed stain vectors, in one OD map); illumination gain and
    tint (grey or yellowish glass), saturation and a small hue rotation (one colour matrix); gamma and contrast; a 3x3
    blur on about half the images; sensor noise. Shifts and perturbations stay small, so no eosin is painted onto IHC
    nor DAB onto H&E: the stain label stays true.

    With ``fade_prob`` a share of the images is also faded: every stain concentration is scaled by one factor drawn
    from ``[0.15, 1]``, as in an under-stained or washed-out slide. Without it a pale image would only ever be a pale
    IHC counterstain, and a selector learns "pale means IHC" -- wrong on the faint H&E of other labs.

    Args:
        rgb: ``(B, 3, H, W)`` transmission in ``[0, 1]``.
        generator: the random generator (for determinism).
        strength: scales every perturbation range (0 returns ``rgb``).
        fade_prob: probability that an image is faded.
        eosin_hue: ``(low, high)`` range (radians) of a turn of the eosin vector about the grey axis, drawn per
            image: eosin ranges from orange-pink to magenta between labs, and a faded eosin drifts toward the hue of
            DAB mixed with hematoxylin. ``(0, 1)`` spans 56 to about 113 degrees in the chroma plane (Ruifrok's
            eosin is at 56, DAB at 138, hematoxylin at 0); ``None`` leaves eosin's hue alone.
        hematoxylin_hue: the same for the hematoxylin vector (a blued IHC counterstain sits at about -25 degrees,
            a purple H&E nucleus above 0); ``None`` leaves it alone.
        dab_hue: the same for the DAB vector (real DAB is browner than Ruifrok's, up to about 165 degrees); ``None``
            leaves it alone. Each turn draws from the generator only when its range is set, so the other
            arguments give the images they gave before.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    if strength <= 0:
        return rgb
    b, s, device = rgb.shape[0], float(strength), rgb.device
    rgb = rgb.float().cpu()
    eye = torch.eye(3)
    # od' = od @ inv(S) @ diag(alpha) @ S' + beta @ S': scaled concentrations, re-stained with vectors S'.
    alpha = _uniform(generator, b, 1 - 0.35 * s, 1 + 0.35 * s, 3)
    if fade_prob > 0:
        faded = torch.rand(b, 1, generator=generator) < fade_prob
        alpha = torch.where(faded, alpha * _uniform(generator, b, _FADE_MIN, 1.0, 1), alpha)
    beta = _uniform(generator, b, -0.03 * s, 0.03 * s, 3)
    restain = (_HED + 0.05 * s * torch.randn(b, 3, 3, generator=generator)).abs()
    restain = restain / restain.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    # Each stain's hue differs between labs more than the small perturbation above (eosin: orange-pink to magenta).
    for index, hue in ((1, eosin_hue), (0, hematoxylin_hue), (2, dab_hue)):
        if hue is not None and hue[1] > hue[0]:
            turn = _uniform(generator, b, float(hue[0]), float(hue[1])).view(-1, 1, 1)
            vector = (_grey_rotation(turn) @ restain[:, index : index + 1].transpose(1, 2)).squeeze(-1).abs()
            vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            restain = torch.cat([restain[:, :index], vector.unsqueeze(1), restain[:, index + 1 :]], dim=1)
    od_map = _HED_INV @ torch.diag_embed(alpha) @ restain
    od_shift = (beta.unsqueeze(1) @ restain).squeeze(1)
    out = intensity_from_optical_density(jitter_optical_density(optical_density(rgb, 1.0), od_map, od_shift), 1.0)
    # Colour changes that are linear in RGB, composed into one matrix per image: gain and tint, saturation around the
    # luminance, and a small hue rotation about the grey axis.
    gain = _uniform(generator, b, 1 - 0.35 * s, 1.0, 1) * _uniform(generator, b, 1 - 0.1 * s, 1.0, 3)
    luma = torch.tensor([0.299, 0.587, 0.114])
    sat = _uniform(generator, b, 1 - 0.6 * s, 1 + 0.3 * s).view(-1, 1, 1)
    saturation = sat * eye + (1 - sat) * torch.ones(3, 1) * luma
    angle = _uniform(generator, b, -0.1 * s, 0.1 * s).view(-1, 1, 1)
    rotation = _grey_rotation(angle)
    colour = rotation @ saturation @ torch.diag_embed(gain)
    out = torch.einsum("bij,bjhw->bihw", colour, out).clamp(1e-4, 1.0)
    out = out ** torch.exp(_uniform(generator, b, -0.3 * s, 0.3 * s, 1, 1, 1))
    contrast = _uniform(generator, b, 1 - 0.3 * s, 1 + 0.2 * s, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + contrast * (out - mean)
    blur = torch.rand(b, generator=generator) < 0.5 * min(1.0, s)
    if bool(blur.any()):
        out[blur] = F.avg_pool2d(F.pad(out[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = torch.randn(out.shape, generator=generator) * _uniform(generator, b, 0.0, 0.02 * s, 1, 1, 1)
    return (out + noise).clamp(0.0, 1.0).to(device)


def eosin_index(rgb: np.ndarray, max_side: int = 256) -> float:
    """Eosin index of one ``(H, W, 3)`` uint8 image (the column :data:`EOSIN_INDEX` of the stain statistics).

    Args:
        rgb: ``(H, W, 3)`` uint8 image.
        max_side: the image is downsampled (antialiased) to about this side first.

    Returns:
        The OD-weighted mean of ``(OD_green - OD_blue) / OD_total``: H&E is higher than HER2-IHC.

    Raises:
        ValueError: if ``rgb`` is not an ``(H, W, 3)`` array.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    x = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0
    scale = max_side / max(x.shape[-2:])
    if scale < 1:
        size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    extractor = StainFeatureExtractor(white_pool=max(1, min(4, *x.shape[-2:])))
    with torch.no_grad():
        return float(extractor.pool_features(extractor.optical_density(x), hue=False)[0, EOSIN_INDEX])


def order_he_ihc(first: np.ndarray, second: np.ndarray, margin: float = 0.03) -> tuple[bool, float]:
    """Decide which of two images of one registered pair is the H&E (the one with the higher eosin index).

    Args:
        first: ``(H, W, 3)`` uint8 image.
        second: ``(H, W, 3)`` uint8 image.
        margin: smallest eosin-index difference accepted as a decision.

    Returns:
        ``(first_is_he, difference)`` where ``difference = index(first) - index(second)``.

    Raises:
        ValueError: if the two images are too similar in stain colour to tell apart.
    """
    difference = eosin_index(first) - eosin_index(second)
    if abs(difference) < margin:
        raise ValueError(
            f"cannot tell which half is H&E: eosin indices differ by only {difference:+.4f} (need {margin})"
        )
    return difference > 0, difference
