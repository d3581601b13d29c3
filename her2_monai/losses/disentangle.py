"""ShaSpec disentanglement losses: alignment (DAO) of shared features and stain classification (DCO) of specific ones.

* **DAO** pulls the two stains' shared features of the same case together: L1 distance (ShaSpec's ablation winner) or
  a Gaussian-kernel MMD (the loss named in the MM'25 text).
* **DCO** is the cross-entropy of a linear stain classifier on the globally pooled specific features, with the stain
  as target, so specific features keep what identifies their stain.

Both are averaged only over the samples a mask selects (by default, samples where both stains are real) and return a
zero that is still connected to the graph when no sample qualifies, so ``loss.backward()`` and DDP behave the same in
every batch. The total used by the classifiers is ``task + 0.1 * DAO + 0.02 * DCO`` (ShaSpec; larger weights hurt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gaussian_mmd", "DomainAlignmentLoss", "DomainClassificationLoss", "DisentanglementLoss"]

#: Multipliers of the median-heuristic squared bandwidth summed in the MMD kernel.
DEFAULT_MMD_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 zero that depends on ``tensors`` (so the autograd graph and DDP's used-parameter set stay intact)."""
    return sum(t.float().sum() for t in tensors) * 0.0


def _pool(x: torch.Tensor, pooled: bool) -> torch.Tensor:
    """``(B, C, ...)`` -> ``(B, C)`` by global average pooling if ``pooled``, else flattened ``(B, C * ...)``."""
    if x.ndim > 2:
        x = x.flatten(2).mean(dim=2) if pooled else x.flatten(1)
    return x.float()


def _sample_mask(sample_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if sample_mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    sample_mask = sample_mask.to(device)
    if sample_mask.shape[0] != batch:
        raise ValueError(f"sample_mask has {sample_mask.shape[0]} rows but the features have {batch} samples")
    return sample_mask > 0.5 if sample_mask.is_floating_point() else sample_mask.bool()


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, scales: Sequence[float] = DEFAULT_MMD_SCALES) -> torch.Tensor:
    """Biased (V-statistic) estimate of the squared MMD between samples ``x`` and ``y``, multi-bandwidth RBF kernel.

    ``k(a, b) = mean_s exp(-||a - b||^2 / (2 * s * sigma^2))`` where ``sigma^2`` is the median squared distance between
    all distinct points of ``x`` and ``y`` (detached: the bandwidth is a statistic, not something to optimise). The
    biased estimate is never negative and is exactly zero for identical sets, also for one sample per set.

    Args:
        x: ``(N, D)``.
        y: ``(M, D)``.
        scales: bandwidth multipliers.

    Returns:
        Scalar ``MMD^2``.
    """
    joint = torch.cat([x, y], dim=0)
    dist2 = torch.cdist(joint, joint).pow(2)
    positive = dist2.detach()[dist2.detach() > 0]
    sigma2 = positive.median() if positive.numel() else dist2.new_tensor(1.0)
    kernel = sum(torch.exp(-dist2 / (2.0 * s * sigma2)) for s in scales) / len(scales)
    n = x.shape[0]
    k_xx, k_yy, k_xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return (k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean()).clamp_min(0.0)


class DomainAlignmentLoss(nn.Module):
    """DAO: distance between the shared features of two stains.

    ``"l1"`` compares each sample's two shared features (paired, ``mean |a - b|``); ``"mmd"`` compares the two sets of
    selected samples as distributions (unpaired, :func:`gaussian_mmd`). By default the feature maps are globally
    average-pooled first: BCI pairs are registered only roughly, so position-by-position L1 between maps would also
    punish misregistration, while pooled features compare what the two stains say about the whole patch.

    Args:
        mode: ``"l1"`` or ``"mmd"``.
        pooled: compare global-average-pooled features (``True``) or the full flattened maps (``False``).
        mmd_scales: bandwidth multipliers for ``"mmd"``.

    Raises:
        ValueError: for an unknown ``mode``.
    """

    def __init__(self, mode: str = "l1", pooled: bool = True, mmd_scales: Sequence[float] = DEFAULT_MMD_SCALES) -> None:
        super().__init__()
        if mode not in ("l1", "mmd"):
            raise ValueError(f"DAO mode must be 'l1' or 'mmd', got '{mode}'")
        self.mode = mode
        self.pooled = pooled
        self.mmd_scales = tuple(mmd_scales)

    def forward(
        self, shared_a: torch.Tensor, shared_b: torch.Tensor, sample_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute DAO.

        Args:
            shared_a: ``(B, C, h, w)`` or ``(B, C)`` shared features of stain A.
            shared_b: same shape, stain B.
            sample_mask: ``(B,)`` bool/0-1 selection of the samples to use; ``None``: all.

        Returns:
            Scalar float32 loss; zero (connected to the graph) when no sample is selected.

        Raises:
            ValueError: if the two feature tensors differ in shape or the mask in length.
        """
        if shared_a.shape != shared_b.shape:
            raise ValueError(
                f"shared features must have the same shape, got {tuple(shared_a.shape)} and {tuple(shared_b.shape)}"
            )
        keep = _sample_mask(sample_mask, shared_a.shape[0], shared_a.device)
        a, b = _pool(shared_a, self.pooled), _pool(shared_b, self.pooled)
        if self.mode == "l1":
            weights = keep.float()
            per_sample = (a - b).abs().mean(dim=1)
            return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
        if not bool(keep.any()):
            return _zero_like_graph(shared_a, shared_b)
        return gaussian_mmd(a[keep], b[keep], self.mmd_scales)


class DomainClassificationLoss(nn.Module):
    """DCO: cross-entropy of the stain classifier on each stain's specific features, the target being that stain.

    ``stain_logits[i]`` holds the classifier's logits for the specific features of stain ``i`` (from stain ``i``'s
    specific encoder), so its target is ``i`` for every sample.
    """

    def forward(self, stain_logits: Sequence[torch.Tensor], sample_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute DCO.

        Args:
            stain_logits: one ``(B, num_stains)`` tensor per stain, in stain order.
            sample_mask: ``(B,)`` (same selection for every stain) or ``(B, num_stains)`` (per stain); ``None``: all.

        Returns:
            Scalar float32 loss, the mean over selected (sample, stain) entries; zero (connected to the graph) when
            none is selected.

        Raises:
            ValueError: if the logits do not have one column per stain or the mask does not fit.
        """
        num_stains = len(stain_logits)
        batch = stain_logits[0].shape[0]
        for logits in stain_logits:
            if logits.ndim != 2 or logits.shape != (batch, num_stains):
                raise ValueError(f"each stain's logits must be (B={batch}, {num_stains}), got {tuple(logits.shape)}")
        if sample_mask is None:
            weights = torch.ones(batch, num_stains, device=stain_logits[0].device)
        else:
            if sample_mask.ndim == 1:
                sample_mask = sample_mask[:, None].expand(-1, num_stains)
            if sample_mask.shape != (batch, num_stains):
                raise ValueError(f"sample_mask must be (B,) or (B, {num_stains}), got {tuple(sample_mask.shape)}")
            weights = _sample_mask(sample_mask, batch, stain_logits[0].device).float()
        losses = torch.stack(
            [
                F.cross_entropy(logits.float(), torch.full((batch,), i, device=logits.device), reduction="none")
                for i, logits in enumerate(stain_logits)
            ],
            dim=1,
        )
        return (losses * weights).sum() / weights.sum().clamp_min(1.0)


class DisentanglementLoss(nn.Module):
    """Weighted DAO and DCO terms of ShaSpec, ready to add to the task loss.

    Args:
        dao_weight: weight of DAO (0.1 in ShaSpec).
        dco_weight: weight of DCO (0.02 in ShaSpec).
        dao_mode: ``"l1"`` or ``"mmd"`` (see :class:`DomainAlignmentLoss`).
        dao_pooled: compare pooled shared features (see :class:`DomainAlignmentLoss`).
    """

    def __init__(
        self, dao_weight: float = 0.1, dco_weight: float = 0.02, dao_mode: str = "l1", dao_pooled: bool = True
    ) -> None:
        super().__init__()
        self.dao_weight = float(dao_weight)
        self.dco_weight = float(dco_weight)
        self.dao = DomainAlignmentLoss(dao_mode, pooled=dao_pooled)
        self.dco = DomainClassificationLoss()

    def forward(
        self,
        shared_a: torch.Tensor,
        shared_b: torch.Tensor,
        stain_logits: Sequence[torch.Tensor],
        dao_mask: torch.Tensor | None = None,
        dco_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted terms.

        Args:
            shared_a: shared features of stain A ``(B, C, h, w)``.
            shared_b: shared features of stain B.
            stain_logits: per-stain ``(B, num_stains)`` stain-classifier logits of the specific features.
            dao_mask: ``(B,)`` samples used by DAO.
            dco_mask: ``(B,)`` or ``(B, num_stains)`` entries used by DCO.

        Returns:
            ``{"dao": dao_weight * DAO, "dco": dco_weight * DCO}``, float32 scalars.
        """
        return {
            "dao": self.dao_weight * self.dao(shared_a, shared_b, dao_mask),
            "dco": self.dco_weight * self.dco(stain_logits, dco_mask),
        }
