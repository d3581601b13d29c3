"""Per-image inputs of the out-of-distribution scores besides the logits and the pooled embedding.

An OOD score reads named arrays, one row per case (:data:`OODInputs`): ``logits`` and ``embedding`` come from the
classifier; the others are computed here from the images a case really has. They are **per stain slot**: ``image_he``
and ``image_ihc`` hold the statistics of the H&E and of the IHC image, with a row of NaN where the case has no image of
that stain (a synthesised stain is the CM-GAN's output, not evidence about the input). So a score fitted per stain
serves every scenario: a dual case is scored on both images, an H&E-only case on its H&E image.

* ``image_<stain>``: :class:`ImageStatistics` of the model input (the image as resized for the classifier) -- colour
  deconvolution statistics (:class:`~her2_monai.stain_features.StainFeatureExtractor`) and multi-scale texture;
* ``stages_<stain>``: channel means and standard deviations of the shared encoder's four stages
  (:func:`stage_statistics`);
* ``cycle_<stain>``: the CM-GAN's cycle error, e.g. mean ``|ihc_to_he(he_to_ihc(he)) - he|`` (:func:`cycle_error`).

:func:`classify_with_ood_inputs` calls the classifier and computes the ones a score asks for (:func:`ood_inputs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from her2_monai.constants import HE_KEY, IHC_KEY, LABEL_KEY, MASK_KEY, UNLABELLED
from her2_monai.stain_batch import scenario_inputs
from her2_monai.stain_features import StainFeatureExtractor

__all__ = [
    "OODInputs",
    "STAIN_SLOTS",
    "BASE_INPUTS",
    "IMAGE_STATS",
    "STAGE_STATS",
    "CYCLE_ERROR",
    "slot_key",
    "ImageStatistics",
    "stage_statistics",
    "capture_stage_statistics",
    "cycle_error",
    "needs_stage_statistics",
    "ood_inputs",
    "classify_with_ood_inputs",
    "classify_scenarios",
]

#: ``{name: (N, D) numpy array}``; per-stain arrays have NaN rows where a case lacks that stain.
OODInputs = dict[str, np.ndarray]

#: Stain slots, in mask-column order.
STAIN_SLOTS = ("he", "ihc")
#: Inputs every classifier call gives.
BASE_INPUTS = ("logits", "embedding")
#: Per-stain feature families (``<family>_he``, ``<family>_ihc``).
IMAGE_STATS = "image"
STAGE_STATS = "stages"
CYCLE_ERROR = "cycle"
_FAMILIES = (IMAGE_STATS, STAGE_STATS, CYCLE_ERROR)


def slot_key(family: str, slot: str) -> str:
    """The input name of one family's statistics of one stain slot, e.g. ``image_he``."""
    return f"{family}_{slot}"


class ImageStatistics(nn.Module):
    """Stain and texture statistics of an image batch, computed on whatever resolution it is given.

    Columns: the 27 stain statistics of :class:`~her2_monai.stain_features.StainFeatureExtractor` (concentrations,
    proportions, channel OD, eosin index, tissue fraction, hue histogram, saturation), then per scale ``s`` in
    ``scales`` (the total optical density average-pooled by ``s``) the log of the mean gradient magnitude, the log of
    the mean absolute Laplacian and the log of the mean local standard deviation in 3x3 windows. Texture is measured on
    optical density so a brighter scanner does not read as a smoother tissue; logs make the energies roughly Gaussian.

    Args:
        scales: pooling factors of the texture statistics; the input must be at least ``3 * max(scales)`` pixels wide.
    """

    def __init__(self, scales: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError(f"scales must be positive integers, got {tuple(scales)}")
        self.scales = tuple(int(s) for s in scales)
        self.stain = StainFeatureExtractor()
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", kernel.view(1, 1, 3, 3), persistent=False)

    @property
    def num_features(self) -> int:
        """Width of the output."""
        return self.stain.num_features + 3 * len(self.scales)

    def forward(self, x: Tensor) -> Tensor:
        """Compute the statistics.

        Args:
            x: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.

        Returns:
            ``(B, num_features)`` float32.

        Raises:
            ValueError: for an image smaller than ``3 * max(scales)`` pixels.
        """
        if min(x.shape[-2:]) < 3 * max(self.scales):
            raise ValueError(f"images must be at least {3 * max(self.scales)} px wide, got {tuple(x.shape[-2:])}")
        # float32 whatever the caller's autocast: the statistics are compared with stored training values, and the
        # deconvolution's matrix products and the Laplacian would otherwise run in bfloat16 on some CPUs.
        with torch.autocast(x.device.type, enabled=False):
            od = self.stain.optical_density(x.float())
            total = od.sum(dim=1, keepdim=True)
            texture = []
            for scale in self.scales:
                t = F.avg_pool2d(total, scale) if scale > 1 else total
                dy, dx = t[..., 1:, :-1] - t[..., :-1, :-1], t[..., :-1, 1:] - t[..., :-1, :-1]
                local_var = F.avg_pool2d(t.square(), 3, stride=1) - F.avg_pool2d(t, 3, stride=1).square()
                texture += [
                    (dx.square() + dy.square()).sqrt().mean(dim=(1, 2, 3)),
                    F.conv2d(t, self.laplacian).abs().mean(dim=(1, 2, 3)),
                    local_var.clamp_min(0.0).sqrt().mean(dim=(1, 2, 3)),
                ]
            return torch.cat([self.stain.pool_features(od), torch.log(torch.stack(texture, dim=1) + 1e-4)], dim=1)


def stage_statistics(maps: Sequence[Tensor]) -> Tensor:
    """Channel means and standard deviations of feature maps, concatenated.

    Args:
        maps: ``(B, C_i, h_i, w_i)`` tensors.

    Returns:
        ``(B, 2 * sum(C_i))`` float32.
    """
    columns = []
    for m in maps:
        m = m.float()
        columns.extend((m.mean(dim=(2, 3)), m.std(dim=(2, 3), unbiased=False)))
    return torch.cat(columns, dim=1)


def _shared_stages(network: nn.Module) -> Sequence[nn.Module] | None:
    shared = getattr(getattr(network, "encoder", None), "shared", None)
    return getattr(shared, "stages", None)


@contextlib.contextmanager
def capture_stage_statistics(network: nn.Module) -> Iterator[list[Tensor]]:
    """Record :func:`stage_statistics` of the shared encoder's stages during the classifier calls in the block.

    The shared trunk of :class:`~her2_monai.networks.her2net.HER2FlexibleNet` encodes both stain slots in one batch
    (H&E rows, then IHC rows), so each call appends one ``(2B, D)`` tensor.

    Args:
        network: a classifier with ``encoder.shared.stages``.

    Yields:
        The list the statistics are appended to.

    Raises:
        ValueError: for a network without a shared encoder.
    """
    stages = _shared_stages(network)
    if stages is None:
        raise ValueError(f"{type(network).__name__} has no shared encoder stages to take statistics of")
    captured: list[Tensor] = []
    pending: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        pending.append(output.detach())
        if len(pending) == len(stages):
            captured.append(stage_statistics(pending))
            pending.clear()

    handles = [stage.register_forward_hook(hook) for stage in stages]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def cycle_error(cmgan: nn.Module, image: Tensor, is_ihc: bool) -> Tensor:
    """Mean absolute error of a round trip through the CM-GAN (H&E -> IHC -> H&E, or IHC -> H&E -> IHC).

    Args:
        cmgan: a :class:`~her2_monai.networks.cmgan.CrossModalGAN` (``he_to_ihc``, ``ihc_to_he``).
        image: ``(B, 3, H, W)`` in ``[-1, 1]``.
        is_ihc: the images are IHC.

    Returns:
        ``(B, 1)`` float32.
    """
    forward, back = (cmgan.ihc_to_he, cmgan.he_to_ihc) if is_ihc else (cmgan.he_to_ihc, cmgan.ihc_to_he)
    again = back(forward(image)).float()
    return (again - image.float()).abs().mean(dim=(1, 2, 3))[:, None]


def _per_slot(values: Tensor, present: Tensor) -> np.ndarray:
    """``(B, D)`` numpy rows with NaN where the slot is empty."""
    out = values.detach().float().cpu().numpy().astype(np.float64)
    out[~present.cpu().numpy()] = np.nan
    return out


def needs_stage_statistics(names: Sequence[str]) -> bool:
    """Whether any of ``names`` is a ``stages_*`` input (the classifier call must then be watched)."""
    return any(name.startswith(STAGE_STATS + "_") for name in names)


def ood_inputs(
    network: nn.Module,
    outputs: Mapping[str, Tensor],
    he: Tensor,
    ihc: Tensor,
    available: Tensor,
    names: Sequence[str],
    stage_features: Tensor | None = None,
    image_statistics: ImageStatistics | None = None,
) -> OODInputs:
    """The named OOD inputs of one classifier call.

    Args:
        network: the classifier (its ``cmgan`` for ``cycle_*``).
        outputs: its outputs (``logits``, ``embedding``).
        he: ``(B, 3, H, W)`` H&E images it was given, in ``[-1, 1]``.
        ihc: ``(B, 3, H, W)`` IHC images.
        available: ``(B, 2)`` availability of the real stains (the call's mask).
        names: inputs wanted (see the module docstring).
        stage_features: ``(2B, D)`` from :func:`capture_stage_statistics`, needed for ``stages_*``.
        image_statistics: the statistics module to reuse (default: a new one).

    Returns:
        :data:`OODInputs` with exactly ``names``.

    Raises:
        ValueError: for an unknown name, or a family the network or the call cannot give.
    """
    present = torch.as_tensor(available).bool()
    images = {"he": he, "ihc": ihc}
    result: OODInputs = {}
    for name in names:
        if name in BASE_INPUTS:
            result[name] = outputs[name].detach().float().cpu().numpy().astype(np.float64)
            continue
        family, _, slot = name.rpartition("_")
        if family not in _FAMILIES or slot not in STAIN_SLOTS:
            raise ValueError(f"unknown OOD input '{name}'")
        rows = present[:, STAIN_SLOTS.index(slot)]
        image = images[slot]
        if family == IMAGE_STATS:
            stats = (image_statistics or ImageStatistics()).to(image.device)
            values = stats(image)
        elif family == STAGE_STATS:
            if stage_features is None:
                raise ValueError(f"'{name}' needs the stage statistics captured during the classifier call")
            values = stage_features.chunk(2, dim=0)[STAIN_SLOTS.index(slot)]
        else:
            cmgan = getattr(network, "cmgan", None)
            if cmgan is None:
                raise ValueError(f"'{name}' needs a classifier with a CM-GAN")
            values = torch.full((rows.shape[0], 1), float("nan"), device=image.device)
            if bool(rows.any()):
                index = rows.nonzero().flatten().to(image.device)
                values[index] = cycle_error(cmgan, image.index_select(0, index), slot == "ihc").to(values.device)
        result[name] = _per_slot(values, rows)
    return result


def classify_with_ood_inputs(
    network: nn.Module,
    he: Tensor,
    ihc: Tensor,
    mask: Tensor,
    names: Sequence[str],
    forward: Any = None,
    image_statistics: ImageStatistics | None = None,
) -> tuple[dict[str, Tensor], OODInputs]:
    """Call the classifier once and take the named OOD inputs of the call.

    Args:
        network: the classifier.
        he: ``(B, 3, H, W)``.
        ihc: ``(B, 3, H, W)``.
        mask: ``(B, 2)`` availability.
        names: OOD inputs wanted.
        forward: the callable to classify with (default ``network``; e.g. a compiled copy). When stage statistics
            are wanted, ``network`` itself is called, since hooks watch its modules.
        image_statistics: the statistics module to reuse.

    Returns:
        The classifier's outputs and the :data:`OODInputs`.
    """
    available = torch.as_tensor(mask) > 0.5
    if not needs_stage_statistics(names):
        outputs = (forward or network)(he, ihc, mask)
        return outputs, ood_inputs(network, outputs, he, ihc, available, names, None, image_statistics)
    with capture_stage_statistics(network) as captured:
        outputs = network(he, ihc, mask)
    stages = captured[-1] if captured else None
    return outputs, ood_inputs(network, outputs, he, ihc, available, names, stages, image_statistics)


def classify_scenarios(
    network: nn.Module,
    batch: Mapping[str, Tensor],
    scenarios: Sequence[str],
    names: Sequence[str] = (),
    forward: Any = None,
    image_statistics: ImageStatistics | None = None,
) -> Iterator[tuple[str, Tensor, dict[str, Tensor], OODInputs]]:
    """Classify a batch once per missing-stain scenario: the scenario loop of evaluation and calibration alike.

    Each scenario hides a stain of the labelled samples as a missing stain is hidden at inference
    (:func:`~her2_monai.stain_batch.scenario_inputs`); scenarios that select no sample are skipped. Gradient and
    autocast modes are the caller's: run the loop inside them.

    Args:
        network: the classifier, ``forward(he, ihc, mask) -> dict``.
        batch: a prepared stain batch (:func:`~her2_monai.stain_batch.prepare_stain_batch`); samples without a label
            key, or labelled :data:`~her2_monai.constants.UNLABELLED`, are left out.
        scenarios: scenarios to run, in order.
        names: OOD inputs to take of each call (see :func:`classify_with_ood_inputs`).
        forward: the callable to classify with (default ``network``).
        image_statistics: the statistics module to reuse.

    Yields:
        ``(scenario, selected, outputs, ood_inputs)``: ``selected`` the ``(B,)`` bool mask of the batch's samples
        that were classified, in the order of the outputs.
    """
    labels = batch.get(LABEL_KEY, torch.full((batch[MASK_KEY].shape[0],), UNLABELLED))
    labelled = labels >= 0
    for scenario in scenarios:
        selected, he, ihc, mask = scenario_inputs(batch[HE_KEY], batch[IHC_KEY], batch[MASK_KEY], scenario, labelled)
        if not bool(selected.any()):
            continue
        outputs, inputs = classify_with_ood_inputs(
            network, he, ihc, mask, names, forward=forward, image_statistics=image_statistics
        )
        yield scenario, selected, outputs, inputs
