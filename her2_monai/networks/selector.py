"""Branch selector: tells whether an input patch is H&E or HER2-IHC, and turns that decision into model inputs.

The MM'25 framework routes each incoming image to the right path (H&E encoder, IHC encoder, or CM-GAN synthesis of
the missing stain). :class:`BranchSelector` is the small CNN that makes that call. Because it is trained on the
procedural demo data but must label slides from other laboratories, it fuses the CNN with stain statistics computed
in-graph by colour deconvolution (:class:`StainFeatureExtractor`): eosin (pink) is present in H&E and absent in IHC,
DAB (brown) the other way round, and those facts do not depend on the lab.

Helpers turn selector output into the batch format every classifier takes: :func:`route` (one sample),
:func:`mask_to_scenario` (a batch mask), :func:`stains_to_inputs` (single unknown-stain images -> ``(he, ihc, mask)``)
and :func:`check_stain_inputs` (validation shared by the classifiers). :func:`train_selector` trains the selector on
demo renders.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from her2_monai.constants import DUAL, HE_ONLY, IHC_ONLY, NUM_CLASSES, STAIN_CLASS_NAMES, scenario_from_mask

if TYPE_CHECKING:
    from her2_monai.data.demo import DemoPairGenerator

__all__ = [
    "RUIFROK_HED_VECTORS",
    "STAIN_FEATURE_SETS",
    "StainFeatureExtractor",
    "BranchSelector",
    "route",
    "mask_to_scenario",
    "check_stain_inputs",
    "stains_to_inputs",
    "augment_stain_batch",
    "train_selector",
]

logger = logging.getLogger(__name__)

#: Optical-density vectors of hematoxylin, eosin and DAB (Ruifrok & Johnston 2001), the rows of scikit-image's
#: ``rgb_from_hed`` before normalisation.
RUIFROK_HED_VECTORS: tuple[tuple[float, float, float], ...] = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)

_NUM_STAINS = len(STAIN_CLASS_NAMES)

#: Named subsets of :class:`StainFeatureExtractor` outputs a :class:`BranchSelector` can fuse. ``"invariant"``: the
#: stain proportions and the eosin index, which do not change with stain intensity, tissue amount or illumination
#: (the things that differ most between labs); ``"eosin"``: only the eosin proportion and eosin index -- eosin is what
#: H&E always has and IHC never has, whereas DAB is absent from HER2-0 IHC and hematoxylin is in both;
#: ``"all"``: every statistic.
STAIN_FEATURE_SETS: dict[str, tuple[int, ...]] = {
    "eosin": (7, 12),
    "invariant": (6, 7, 8, 12),
    "all": tuple(range(14)),
}


def _check_image_batch(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a ``(B, 3, H, W)`` floating-point tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W) with 3 RGB channels in [-1, 1], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype}")


class StainFeatureExtractor(nn.Module):
    """Per-image stain statistics from colour deconvolution, computed in the graph (traceable, no numpy).

    Steps: map ``[-1, 1]`` to RGB transmission in ``(0, 1]``; optionally divide by the image's own white point (the
    brightest locally averaged value per channel) so the grey or yellowish glass of another scanner reads as zero
    optical density; optical density ``OD = -ln(max(rgb, eps))``; stain concentrations by projecting OD on the
    inverse of the normalised hematoxylin/eosin/DAB matrix, as scikit-image's ``rgb2hed`` does (but unclipped, since a
    negative eosin concentration is itself evidence of DAB). Pooled into ``num_features`` numbers:

    ========  ===========================================================================================
    index     feature
    ========  ===========================================================================================
    0-2       mean concentration of H, E, DAB
    3-5       standard deviation of each concentration
    6-8       concentration per unit total OD, OD-weighted (a stain *proportion*, independent of intensity)
    9-11      mean OD of the R, G, B channels
    12        eosin index: OD-weighted mean of ``(OD_green - OD_blue) / OD_total`` (pink vs brown)
    13        tissue fraction: share of pixels whose total OD exceeds ``tissue_od``
    ========  ===========================================================================================

    Args:
        stain_vectors: three RGB optical-density vectors (hematoxylin, eosin, DAB); normalised internally.
        eps: smallest transmission, bounding OD at ``-ln(eps)``.
        white_balance: divide by the estimated white point before taking OD.
        white_pool: side of the average-pooling window used to estimate the white point robustly to noise (inputs
            must be at least this large).
        tissue_od: total-OD threshold that marks a pixel as tissue.

    Raises:
        ValueError: if ``stain_vectors`` is not a non-singular 3x3 matrix or a parameter is out of range.
    """

    num_features: int = 14

    def __init__(
        self,
        stain_vectors: Sequence[Sequence[float]] = RUIFROK_HED_VECTORS,
        eps: float = 1.0 / 255.0,
        white_balance: bool = True,
        white_pool: int = 4,
        tissue_od: float = 0.15,
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
        self.eps = float(eps)
        self.white_balance = bool(white_balance)
        self.white_pool = int(white_pool)
        self.tissue_od = float(tissue_od)
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
            rgb = (rgb / white.clamp_min(0.25)).clamp(self.eps, 1.0)
        return -torch.log(rgb)

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

    def pool_features(self, od: Tensor) -> Tensor:
        """Pool the statistics from an optical-density batch (lets callers reuse an OD they already computed).

        Args:
            od: ``(B, 3, H, W)`` from :meth:`optical_density`.

        Returns:
            ``(B, num_features)`` stain statistics.
        """
        conc = self.concentrations(od)
        total = od.sum(dim=1, keepdim=True)  # (B, 1, H, W)
        weight_sum = total.sum(dim=(2, 3)).clamp_min(1e-6)  # (B, 1)
        proportion = (conc * total).sum(dim=(2, 3)) / (total * total).sum(dim=(2, 3)).clamp_min(1e-6)
        eosin_ratio = (od[:, 1:2] - od[:, 2:3]) / total.clamp_min(1e-3)
        eosin_index = (eosin_ratio * total).sum(dim=(2, 3)) / weight_sum
        tissue = (total > self.tissue_od).to(od.dtype).mean(dim=(2, 3))
        return torch.cat(
            [
                conc.mean(dim=(2, 3)),
                conc.std(dim=(2, 3)),
                proportion,
                od.mean(dim=(2, 3)),
                eosin_index,
                tissue,
            ],
            dim=1,
        )


class BranchSelector(nn.Module):
    """Small CNN that classifies one patch as H&E (class 0) or HER2-IHC (class 1).

    A stack of stride-2 ``Conv-BN-ReLU`` blocks with global average pooling; when ``use_stain_features`` is on, the
    :class:`StainFeatureExtractor` statistics pass through a small MLP and are concatenated with the CNN embedding
    before the linear classifier. The CNN can read either the raw image or its white-balanced optical density
    (``cnn_input="od"``), which removes the scanner's background tint and brightness before any learning happens.

    Training only on synthetic renders invites the CNN to learn render-specific texture; ``branch_dropout`` zeroes the
    whole CNN embedding for a random subset of training samples so the classifier also learns to decide from the
    lab-independent stain statistics alone. Any input size of at least ``2 ** len(channels)`` pixels works.

    Args:
        channels: output channels of the convolution blocks (each halves the resolution).
        use_stain_features: fuse the stain statistics (recommended for images from other labs).
        stain_features: which statistics to fuse, a key of :data:`STAIN_FEATURE_SETS`.
        stain_hidden: width of the stain-feature MLP.
        cnn_input: ``"rgb"`` (the ``[-1, 1]`` image) or ``"od"`` (white-balanced optical density).
        dropout: dropout before the classifier.
        branch_dropout: probability of zeroing the CNN embedding of a training sample (needs ``use_stain_features``).
        max_input_size: inputs whose longer side exceeds this are first downsampled (antialiased) to it, keeping the
            aspect ratio; ``None`` disables. The CNN then sees texture at the scale it was trained on: whole real
            1024 px, 0.46 um/px patches were labelled correctly when given at 96 to 256 px, but not always at 64 px
            (see ``benchmarks/eval_selector_transfer.py``). A traced model keeps the decision for its example size.
        stain_kwargs: extra arguments for :class:`StainFeatureExtractor`.

    Raises:
        ValueError: on an unknown ``cnn_input`` or ``stain_features``, empty ``channels``, a probability outside
            ``[0, 1)`` or a ``max_input_size`` too small for the network.

    Example::

        selector = BranchSelector().eval()
        stain = selector.predict_stain(x)  # (B,) long, 0 = H&E, 1 = IHC
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 64),
        use_stain_features: bool = True,
        stain_features: str = "eosin",
        stain_hidden: int = 32,
        cnn_input: str = "od",
        dropout: float = 0.1,
        branch_dropout: float = 0.3,
        max_input_size: int | None = 128,
        stain_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if cnn_input not in ("rgb", "od"):
            raise ValueError(f"cnn_input must be 'rgb' or 'od', got '{cnn_input}'")
        if stain_features not in STAIN_FEATURE_SETS:
            raise ValueError(f"stain_features must be one of {sorted(STAIN_FEATURE_SETS)}, got '{stain_features}'")
        if len(channels) == 0:
            raise ValueError("channels must list at least one convolution block")
        for name, p in (("dropout", dropout), ("branch_dropout", branch_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if max_input_size is not None and max_input_size < 2 ** len(channels):
            raise ValueError(f"max_input_size must be at least {2 ** len(channels)} pixels, got {max_input_size}")
        self.max_input_size = max_input_size
        self.cnn_input = cnn_input
        self.use_stain_features = bool(use_stain_features)
        self.branch_dropout = float(branch_dropout) if self.use_stain_features else 0.0
        # The OD view needs the deconvolution module even when its pooled features are not fused.
        self.stain = StainFeatureExtractor(**(stain_kwargs or {}))
        blocks: list[nn.Module] = []
        in_ch = 3
        for out_ch in channels:
            blocks.append(Convolution(2, in_ch, out_ch, strides=2, kernel_size=3, act="RELU", norm="BATCH"))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        embed = in_ch
        self.register_buffer(
            "feature_index", torch.tensor(STAIN_FEATURE_SETS[stain_features], dtype=torch.long), persistent=False
        )
        if self.use_stain_features:
            n_features = len(STAIN_FEATURE_SETS[stain_features])
            self.stain_mlp = nn.Sequential(
                nn.BatchNorm1d(n_features),
                nn.Linear(n_features, stain_hidden),
                nn.ReLU(inplace=True),
            )
            embed += stain_hidden
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed, _NUM_STAINS)

    def forward(self, x: Tensor) -> Tensor:
        """Classify each image.

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B, 2)`` logits; index 0 = H&E, 1 = IHC (``STAIN_CLASS_NAMES``).
        """
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != 3):
            raise ValueError(f"BranchSelector expects (B, 3, H, W) RGB in [-1, 1], got {tuple(x.shape)}")
        if self.max_input_size is not None:
            with warnings.catch_warnings():
                # A traced selector keeps the resize decision made for its example size; that is intended.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                height, width = int(x.shape[-2]), int(x.shape[-1])
                if max(height, width) > self.max_input_size:
                    scale = self.max_input_size / max(height, width)
                    size = (max(1, round(height * scale)), max(1, round(width * scale)))
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        od = self.stain.optical_density(x)
        embedding = self.pool(self.features(x if self.cnn_input == "rgb" else od)).flatten(1)
        if self.use_stain_features:
            if self.training and self.branch_dropout > 0:
                keep = (torch.rand(embedding.shape[0], 1, device=x.device) >= self.branch_dropout).to(embedding.dtype)
                embedding = embedding * keep
            stats = self.stain.pool_features(od).index_select(1, self.feature_index)
            embedding = torch.cat([embedding, self.stain_mlp(stats)], dim=1)
        return self.classifier(self.dropout(embedding))

    @torch.no_grad()
    def predict_stain(self, x: Tensor) -> Tensor:
        """Predicted stain per image (call ``eval()`` first for deterministic results).

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B,)`` long: 0 = H&E, 1 = IHC.
        """
        return self(x).argmax(dim=1)


def route(he_present: bool, ihc_present: bool) -> int:
    """Scenario id for one sample from which stains it has.

    Args:
        he_present: an H&E image is available.
        ihc_present: an IHC image is available.

    Returns:
        ``DUAL`` (0), ``HE_ONLY`` (1) or ``IHC_ONLY`` (2).

    Raises:
        ValueError: if neither stain is present.
    """
    return scenario_from_mask(bool(he_present), bool(ihc_present))


def mask_to_scenario(mask: Tensor) -> Tensor:
    """Scenario id per sample of a batch availability mask.

    Args:
        mask: ``(B, 2)`` with column 0 = H&E available, column 1 = IHC available (0/1 values).

    Returns:
        ``(B,)`` long: ``DUAL``, ``HE_ONLY`` or ``IHC_ONLY``.

    Raises:
        ValueError: if the mask has the wrong shape, holds values other than 0/1, or a row has no stain.
    """
    if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[1] != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, 2) tensor (column 0 = H&E, column 1 = IHC available), got {shape}")
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask must hold only 0 (missing) and 1 (available)")
    he, ihc = mask[:, 0] > 0, mask[:, 1] > 0
    if not torch.all(he | ihc):
        bad = torch.nonzero(~(he | ihc)).flatten().tolist()
        raise ValueError(f"every sample needs at least one stain; samples {bad} have neither H&E nor IHC")
    scenario = torch.full(he.shape, DUAL, dtype=torch.long, device=mask.device)
    scenario[he & ~ihc] = HE_ONLY
    scenario[~he & ihc] = IHC_ONLY
    return scenario


def check_stain_inputs(he: Tensor | None, ihc: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate a classifier batch and fill a wholly missing stain with zeros.

    Args:
        he: ``(B, 3, H, W)`` H&E in ``[-1, 1]`` (zeros where missing) or ``None`` if no sample has H&E.
        ihc: ``(B, 3, H, W)`` IHC in ``[-1, 1]`` or ``None``.
        mask: ``(B, 2)`` availability (column 0 = H&E, column 1 = IHC).

    Returns:
        ``(he, ihc, mask, scenario)`` with both images as tensors, ``mask`` as float and ``scenario`` ``(B,)`` long.

    Raises:
        ValueError: on wrong shapes, mismatched batch sizes, a bad mask, or a stain marked available but passed as
            ``None``.
    """
    if he is None and ihc is None:
        raise ValueError("at least one of he / ihc must be a tensor")
    scenario = mask_to_scenario(mask)
    ref = he if he is not None else ihc
    _check_image_batch(ref, "he" if he is not None else "ihc")
    if ref.shape[0] != mask.shape[0]:
        raise ValueError(f"batch size mismatch: images have {ref.shape[0]} samples, mask has {mask.shape[0]} rows")
    filled = []
    for name, image, column in (("he", he, 0), ("ihc", ihc, 1)):
        if image is None:
            if torch.any(mask[:, column] > 0):
                raise ValueError(f"mask marks {name} available for some samples but {name} is None")
            image = torch.zeros_like(ref)
        else:
            _check_image_batch(image, name)
            if image.shape != ref.shape:
                raise ValueError(
                    f"he and ihc must have the same shape, got {tuple(ref.shape)} and {tuple(image.shape)}"
                )
        filled.append(image)
    return filled[0], filled[1], mask.to(dtype=ref.dtype), scenario


def stains_to_inputs(x: Tensor, stain_pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn single images of unknown stain into the classifiers' ``(he, ihc, mask)`` batch format.

    Args:
        x: ``(B, 3, H, W)`` images in ``[-1, 1]``, one per sample.
        stain_pred: ``(B,)`` selector decisions (0 = H&E, 1 = IHC), e.g. from :meth:`BranchSelector.predict_stain`.

    Returns:
        ``he`` ``(B, 3, H, W)`` (``x`` where predicted H&E, zeros elsewhere), ``ihc`` likewise, and ``mask`` ``(B, 2)``
        float with a single 1 per row.

    Raises:
        ValueError: on a bad image shape, a length mismatch or a prediction other than 0/1.
    """
    _check_image_batch(x)
    stain_pred = torch.as_tensor(stain_pred, device=x.device).long().reshape(-1)
    if stain_pred.numel() != x.shape[0]:
        raise ValueError(f"stain_pred must have one entry per image ({x.shape[0]}), got {stain_pred.numel()}")
    if not torch.all((stain_pred == 0) | (stain_pred == 1)):
        raise ValueError("stain_pred must hold 0 (H&E) or 1 (IHC)")
    is_ihc = stain_pred == 1
    mask = torch.stack([~is_ihc, is_ihc], dim=1).to(x.dtype)
    he = x * mask[:, 0].view(-1, 1, 1, 1)
    ihc = x * mask[:, 1].view(-1, 1, 1, 1)
    return he, ihc, mask


# ---------------------------------------------------------------------------------------------------------- training
def _render_pool(generators: Sequence[DemoPairGenerator], per_class: int, seed: int) -> tuple[list[Tensor], list[int]]:
    """Render ``per_class`` pairs per class and generator; returns ``(3, H, W)`` images in [0, 1] and stain labels."""
    images, stains = [], []
    for g_index, generator in enumerate(generators):
        for label in range(NUM_CLASSES):
            for k in range(per_class):
                pair = generator.render(label, seed=seed * 100_003 + g_index * 1009 + k)
                for stain, img in enumerate(pair):
                    images.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0)
                    stains.append(stain)
    return images, stains


def _uniform(gen: torch.Generator, n: int, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=gen)


def augment_stain_batch(
    rgb: Tensor, gen: torch.Generator, stain: StainFeatureExtractor, strength: float = 1.0
) -> Tensor:
    """Simulate other labs' staining and scanning on a batch of renders.

    Applies, per image: stain-space jitter (scale and shift of the H, E, DAB concentrations, as in Tellez et al., and
    re-staining with slightly perturbed stain vectors), illumination (overall gain and a per-channel tint, e.g. grey or
    yellowish glass), saturation, gamma and contrast changes, a small hue rotation, blur and sensor noise. Shifts and
    perturbations stay small, so no eosin is painted onto IHC nor DAB onto H&E: the stain label stays true.

    Args:
        rgb: ``(B, 3, H, W)`` transmission in ``[0, 1]``.
        gen: random generator (for determinism).
        stain: the deconvolution module providing the stain matrices.
        strength: scales every perturbation range (0 disables augmentation).

    Returns:
        ``(B, 3, H, W)`` augmented RGB in ``[0, 1]``.
    """
    if strength <= 0:
        return rgb
    b, s = rgb.shape[0], float(strength)
    eye = torch.eye(3)
    # Stain-space jitter folded into one affine map of optical density: deconvolve with the reference stain matrix S,
    # scale and shift the concentrations, and re-stain with per-image perturbed stain vectors S' (other labs' stain
    # hues): od' = od @ inv(S) @ diag(alpha) @ S' + beta @ S'.
    alpha = _uniform(gen, b, 1 - 0.35 * s, 1 + 0.35 * s, 3)
    beta = _uniform(gen, b, -0.03 * s, 0.03 * s, 3)
    restain = stain.od_from_stains + 0.05 * s * torch.randn(b, 3, 3, generator=gen)
    restain = restain.abs() / restain.abs().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    od_map = stain.stains_from_od @ torch.diag_embed(alpha) @ restain  # (B, 3, 3)
    od_shift = (beta.unsqueeze(1) @ restain).squeeze(1)  # (B, 3)
    od = -torch.log(rgb.clamp(1.0 / 255.0, 1.0))
    od = torch.einsum("bchw,bcd->bdhw", od, od_map) + od_shift.view(b, 3, 1, 1)
    out = torch.exp(-od.clamp_min(0))
    # Colour changes that are linear in RGB, composed into one matrix per image: illumination gain and tint (grey or
    # yellowish glass), saturation around the luminance, and a small hue rotation about the grey axis.
    gain = _uniform(gen, b, 1 - 0.35 * s, 1.0, 1) * _uniform(gen, b, 1 - 0.1 * s, 1.0, 3)
    luma = torch.tensor([0.299, 0.587, 0.114])
    sat = _uniform(gen, b, 1 - 0.6 * s, 1 + 0.3 * s).view(-1, 1, 1)
    saturation = sat * eye + (1 - sat) * torch.ones(3, 1) * luma  # lum + sat * (rgb - lum)
    angle = _uniform(gen, b, -0.1 * s, 0.1 * s).view(-1, 1, 1)
    k = torch.full((3,), 1.0 / math.sqrt(3.0))
    k_cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rotation = eye * torch.cos(angle) + k_cross * torch.sin(angle) + torch.outer(k, k) * (1 - torch.cos(angle))
    colour = rotation @ saturation @ torch.diag_embed(gain)
    out = torch.einsum("bij,bjhw->bihw", colour, out).clamp(1e-4, 1.0)
    # Gamma and contrast.
    gamma = torch.exp(_uniform(gen, b, -0.3 * s, 0.3 * s, 1, 1, 1))
    out = out**gamma
    contrast = _uniform(gen, b, 1 - 0.3 * s, 1 + 0.2 * s, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + contrast * (out - mean)
    # Blur on a random half of the batch, then sensor noise.
    do_blur = torch.rand(b, generator=gen) < 0.5 * min(1.0, s)
    if bool(do_blur.any()):
        out[do_blur] = F.avg_pool2d(F.pad(out[do_blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = torch.randn(out.shape, generator=gen) * _uniform(gen, b, 0.0, 0.02 * s, 1, 1, 1)
    return (out + noise).clamp(0.0, 1.0)


def _random_crops(
    images: Sequence[Tensor], index: Tensor, gen: torch.Generator, size: int, scale: tuple[float, float]
) -> Tensor:
    """Square crops of random side ``scale * image side`` at random positions, resized to ``size``, flipped/rotated."""
    crops = []
    for i in index.tolist():
        img = images[i]
        side = min(img.shape[-2:])
        crop = int(round(side * float(_uniform(gen, 1, scale[0], scale[1]))))
        crop = max(8, min(crop, side))
        y = int(torch.randint(0, img.shape[-2] - crop + 1, (1,), generator=gen))
        x = int(torch.randint(0, img.shape[-1] - crop + 1, (1,), generator=gen))
        patch = img[:, y : y + crop, x : x + crop].unsqueeze(0)
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if torch.rand(1, generator=gen) < 0.5:
            patch = patch.flip(-1)
        patch = torch.rot90(patch, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
        crops.append(patch)
    return torch.cat(crops).clamp(0.0, 1.0)


def train_selector(
    generators: DemoPairGenerator | Sequence[DemoPairGenerator] | None = None,
    steps: int = 500,
    batch_size: int = 32,
    crop_size: int = 64,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    pool_per_class: int = 4,
    image_size: int = 192,
    labs: Sequence[str] = ("A", "B", "C"),
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    augment_strength: float = 1.0,
    seed: int = 0,
    model: BranchSelector | None = None,
    device: str | torch.device = "cpu",
) -> BranchSelector:
    """Train a :class:`BranchSelector` on demo renders of both stains (deterministic for a given ``seed``).

    A pool of ``pool_per_class`` pairs per HER2 class and generator is rendered once; each step draws a class-balanced
    batch of random crops (side ``crop_scale`` of the render, resized to ``crop_size``), flips/rotations and the lab
    simulation of :func:`augment_stain_batch`. Adam with cosine learning-rate decay. Only demo data is used, so the
    result can be checked honestly on real images from other labs.

    Args:
        generators: one or more ``DemoPairGenerator``; ``None`` builds one per entry of ``labs`` at ``image_size``.
        steps: optimisation steps.
        batch_size: images per step (half H&E, half IHC).
        crop_size: side of the training crops in pixels.
        crop_scale: range of crop side as a fraction of the render side.
        pool_per_class: rendered pairs per class per generator.
        image_size: render size when ``generators`` is ``None``.
        labs: simulated institutions when ``generators`` is ``None``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        augment_strength: scales the colour augmentation (0 turns it off).
        seed: seed for rendering, sampling, augmentation and weight initialisation.
        model: selector to train (a new default one when ``None``).
        device: where to train.

    Returns:
        The trained selector, in ``eval()`` mode.

    Raises:
        ValueError: on non-positive ``steps``/``batch_size``/``pool_per_class`` or an empty generator list.
    """
    if steps < 1 or batch_size < 2 or pool_per_class < 1:
        raise ValueError(
            f"need steps >= 1, batch_size >= 2 and pool_per_class >= 1; got {steps}, {batch_size}, {pool_per_class}"
        )
    if generators is None:
        from her2_monai.data.demo import DemoPairGenerator

        generators = [DemoPairGenerator(image_size=image_size, lab=lab) for lab in labs]
    elif not isinstance(generators, Sequence):
        generators = [generators]
    if len(generators) == 0:
        raise ValueError("train_selector needs at least one demo generator")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = (model or BranchSelector()).to(device)
    images, stains = _render_pool(generators, pool_per_class, seed)
    stain_t = torch.tensor(stains)
    by_stain = [torch.nonzero(stain_t == s).flatten() for s in range(_NUM_STAINS)]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    half = batch_size // 2
    model.train()
    for step in range(steps):
        index = torch.cat(
            [
                pool[torch.randint(0, len(pool), (n,), generator=gen)]
                for pool, n in zip(by_stain, (half, batch_size - half))
            ]
        )
        batch = _random_crops(images, index, gen, crop_size, crop_scale)
        batch = augment_stain_batch(batch, gen, model.stain, augment_strength)
        x = (batch * 2.0 - 1.0).to(device)
        loss = F.cross_entropy(model(x), stain_t[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info("selector step %d/%d loss %.4f", step + 1, steps, loss.item())
    return model.eval()
