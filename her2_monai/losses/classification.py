"""Training objectives of the missing-modality HER2 classifiers, handed to the trainer as ``loss_function``.

Each loss takes the network's output dict, the labels and the availability mask, and returns its named terms with
the total under ``"loss"``, so the trainer logs every term and never needs to know which model it trains:

* :class:`ClassificationLoss`: class-weighted cross-entropy over the labelled samples (MoRA and other plain models);
* :class:`HER2Loss`: plus ShaSpec's DAO and DCO on the shared and specific features (:class:`HER2FlexibleNet`);
* :class:`SimMLMLoss`: plus SimMLM's MoFe ranking of dual against single-stain predictions;
* :class:`SpecialistLoss`: each single-stain specialist's cross-entropy on the images of its stain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from her2_monai.constants import UNLABELLED
from her2_monai.losses.disentangle import DisentanglementLoss
from her2_monai.losses.mofe import MoFeLoss

__all__ = ["AUXILIARY_SAMPLES", "ClassificationLoss", "HER2Loss", "SimMLMLoss", "SpecialistLoss"]

#: Which samples the ShaSpec terms use, see :class:`HER2Loss`.
AUXILIARY_SAMPLES: tuple[str, ...] = ("dual", "real", "all")


def _require(outputs: Mapping[str, Tensor], keys: Sequence[str], model: str) -> None:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise KeyError(f"the network outputs lack {missing}; this loss needs the output dict of {model}")


class ClassificationLoss(nn.Module):
    """Class-weighted cross-entropy of ``outputs["logits"]`` over the labelled samples.

    Samples labelled :data:`UNLABELLED` (``-1``: e.g. MIST pairs, used for stain translation only) do not count; a
    batch without any labelled sample gives a zero that is still connected to the graph, so ``backward()`` and DDP
    behave the same in every batch.

    Args:
        class_weights: one weight per class (``None``: equal), e.g. from
            :func:`~her2_monai.data.datalist.class_weights`.
    """

    def __init__(self, class_weights: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)

    def cross_entropy(self, logits: Tensor, label: Tensor) -> Tensor:
        """Weighted mean cross-entropy over samples with ``label >= 0``.

        Args:
            logits: ``(B, K)``.
            label: ``(B,)`` long, ``-1`` for unlabelled samples.

        Returns:
            Scalar float32.
        """
        logits = logits.float()
        if not bool((label >= 0).any()):
            return logits.sum() * 0.0
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits, label, weight=weight, ignore_index=UNLABELLED)

    def auxiliary(self, outputs: Mapping[str, Tensor], label: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Extra weighted terms of subclasses (none here)."""
        return {}

    def forward(self, outputs: Mapping[str, Tensor], label: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Compute every term and their sum.

        Args:
            outputs: the network's output dict (``logits`` at least).
            label: ``(B,)`` long class indices, ``-1`` = unlabelled.
            mask: ``(B, 2)`` availability the network was given.

        Returns:
            ``{"loss": total, "ce": ..., <auxiliary terms>}``, float32 scalars.

        Raises:
            KeyError: if ``outputs`` lacks what a term needs.
        """
        _require(outputs, ("logits",), "a classifier")
        terms = {"ce": self.cross_entropy(outputs["logits"], label)}
        terms.update(self.auxiliary(outputs, label, mask))
        return {"loss": sum(v.float() for v in terms.values()), **terms}


class HER2Loss(ClassificationLoss):
    """The MM'25 / ShaSpec objective: ``CE + 0.1 * DAO + 0.02 * DCO`` (weights configurable).

    ``auxiliary_samples`` is the rule for which samples the ShaSpec terms use: ``"dual"`` (default) only samples where
    both stains are *real* -- aligning a real H&E with an IHC synthesised from it, or with itself under substitution,
    would reward the GAN's shortcut, not stain invariance; ``"real"``: DAO on dual samples, DCO on every real stain
    image (more data for DCO); ``"all"``: synthetic and substituted stains included.

    Args:
        class_weights: per-class CE weights.
        dao_weight: DAO weight (0.1 in ShaSpec).
        dco_weight: DCO weight (0.02 in ShaSpec).
        dao_mode: ``"l1"`` (ShaSpec) or ``"mmd"`` (MM'25 text).
        dao_pooled: DAO on globally pooled shared features (default) or on full maps.
        auxiliary_samples: ``"dual"``, ``"real"`` or ``"all"``.

    Raises:
        ValueError: for an unknown ``auxiliary_samples`` or ``dao_mode``.
    """

    _NEEDS = ("shared_he", "shared_ihc", "specific_logits_he", "specific_logits_ihc")

    def __init__(
        self,
        class_weights: Sequence[float] | Tensor | None = None,
        dao_weight: float = 0.1,
        dco_weight: float = 0.02,
        dao_mode: str = "l1",
        dao_pooled: bool = True,
        auxiliary_samples: str = "dual",
    ) -> None:
        super().__init__(class_weights)
        if auxiliary_samples not in AUXILIARY_SAMPLES:
            raise ValueError(f"auxiliary_samples must be one of {AUXILIARY_SAMPLES}, got '{auxiliary_samples}'")
        self.auxiliary_samples = auxiliary_samples
        self.disentangle = DisentanglementLoss(dao_weight, dco_weight, dao_mode, dao_pooled)

    def auxiliary(self, outputs: Mapping[str, Tensor], label: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Weighted DAO and DCO over the samples chosen by ``auxiliary_samples``.

        Returns:
            ``{"dao", "dco"}``; zero (connected to the graph) when no sample qualifies.
        """
        _require(outputs, self._NEEDS, "HER2FlexibleNet")
        if mask.ndim != 2 or mask.shape[1] != 2:
            raise ValueError(f"mask must be (B, 2), got {tuple(mask.shape)}")
        available = mask > 0.5
        dual = available.all(dim=1)
        if self.auxiliary_samples == "dual":
            dao_mask, dco_mask = dual, dual
        elif self.auxiliary_samples == "real":
            dao_mask, dco_mask = dual, available
        else:
            dao_mask = dco_mask = torch.ones_like(dual)
        return self.disentangle(
            outputs["shared_he"],
            outputs["shared_ihc"],
            [outputs["specific_logits_he"], outputs["specific_logits_ihc"]],
            dao_mask,
            dco_mask,
        )


class SimMLMLoss(ClassificationLoss):
    """SimMLM's objective: CE on the mixture plus ``mofe_weight`` times the MoFe ranking loss.

    For each labelled dual sample the single-stain predictions are the mixture with one expert masked, which equals
    that expert's logits (``outputs["expert_logits"]``); MoFe penalises the dual loss exceeding either of them.

    Args:
        class_weights: per-class CE weights.
        mofe_weight: MoFe weight (SimMLM: 0.1).
        mofe_margin: margin of the MoFe hinge.

    Raises:
        ValueError: for a negative weight or margin.
    """

    def __init__(
        self, class_weights: Sequence[float] | Tensor | None = None, mofe_weight: float = 0.1, mofe_margin: float = 0.0
    ) -> None:
        super().__init__(class_weights)
        if mofe_weight < 0:
            raise ValueError(f"mofe_weight must be non-negative, got {mofe_weight}")
        self.mofe_weight = float(mofe_weight)
        self.mofe = MoFeLoss(margin=mofe_margin)

    def auxiliary(self, outputs: Mapping[str, Tensor], label: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Weighted MoFe over the labelled dual samples.

        Returns:
            ``{"mofe"}``, zero (connected to the graph) when the batch has no labelled dual sample.
        """
        _require(outputs, ("logits", "expert_logits"), "SimMLMNet")
        logits = outputs["logits"]
        keep = (mask[:, 0] > 0) & (mask[:, 1] > 0) & (label >= 0)
        if self.mofe_weight == 0 or not bool(keep.any()):
            return {"mofe": logits.float().sum() * 0.0}
        loss = self.mofe(logits[keep].float(), outputs["expert_logits"][keep].float(), label[keep])
        return {"mofe": self.mofe_weight * loss}


class SpecialistLoss(ClassificationLoss):
    """Cross-entropy of each single-stain specialist on the labelled samples that have its stain, averaged.

    The specialists of :class:`~her2_monai.networks.alternatives.StainSpecialists` learn independently: neither sees
    the other stain, and the mean of their logits (the dual prediction) is not trained as such.

    Args:
        class_weights: per-class CE weights.
    """

    def forward(self, outputs: Mapping[str, Tensor], label: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Compute the specialists' mean cross-entropy.

        Returns:
            ``{"loss", "ce"}`` (equal), float32 scalars.
        """
        _require(outputs, ("expert_logits",), "StainSpecialists")
        terms = []
        for column in range(outputs["expert_logits"].shape[1]):
            has = mask[:, column] > 0.5
            terms.append(self.cross_entropy(outputs["expert_logits"][has, column], label[has]))
        ce = torch.stack(terms).mean()
        return {"loss": ce, "ce": ce}
