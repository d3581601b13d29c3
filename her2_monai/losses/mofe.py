"""MoFe ("More vs. Fewer") ranking loss of SimMLM: more stains must not predict worse than fewer.

For a sample seen with more modalities (here: H&E + IHC) and with fewer (each stain alone), the task loss with more
modalities should not exceed the task loss with fewer:

    L_MoFe = mean over samples and fewer-modality views of max(0, CE(more) - CE(fewer) + margin)

It is zero whenever the dual prediction already does at least as well as every single-stain prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MoFeLoss"]


class MoFeLoss(nn.Module):
    """Hinge ranking loss between the per-sample cross-entropy with more and with fewer modalities.

    The fewer-modality losses are detached by default (``detach_fewer=True``): with gradient through both sides the
    cheapest way to satisfy the ranking is to make the single-stain predictions *worse*, which is not the intent; with
    the detach the loss only pushes the multi-modal prediction (in SimMLM, mostly the gate) to be at least as good.

    Args:
        margin: the more-modality loss must undercut each fewer-modality loss by this much (0 = just not exceed).
        detach_fewer: stop gradients through the fewer-modality losses.

    Raises:
        ValueError: if ``margin`` is negative.
    """

    def __init__(self, margin: float = 0.0, detach_fewer: bool = True) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.margin = float(margin)
        self.detach_fewer = bool(detach_fewer)

    def forward(self, more_logits: Tensor, fewer_logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            more_logits: ``(N, K)`` logits with all modalities.
            fewer_logits: ``(N, M, K)`` logits of ``M`` reduced-modality views of the same samples (``(N, K)`` is
                taken as ``M = 1``).
            target: ``(N,)`` long class indices.

        Returns:
            Scalar mean hinge (zero for ``N = 0``).

        Raises:
            ValueError: on inconsistent shapes.
        """
        if fewer_logits.ndim == 2:
            fewer_logits = fewer_logits.unsqueeze(1)
        if more_logits.ndim != 2 or fewer_logits.ndim != 3:
            raise ValueError(
                f"expected more_logits (N, K) and fewer_logits (N, M, K), got {tuple(more_logits.shape)} "
                f"and {tuple(fewer_logits.shape)}"
            )
        n, k = more_logits.shape
        if fewer_logits.shape[0] != n or fewer_logits.shape[2] != k or target.shape != (n,):
            raise ValueError(
                f"shape mismatch: more_logits {tuple(more_logits.shape)}, fewer_logits {tuple(fewer_logits.shape)}, "
                f"target {tuple(target.shape)}; expected (N, K), (N, M, K), (N,)"
            )
        if n == 0:
            return more_logits.sum() * 0.0
        more = F.cross_entropy(more_logits, target, reduction="none")  # (N,)
        m = fewer_logits.shape[1]
        fewer = F.cross_entropy(fewer_logits.reshape(n * m, k), target.repeat_interleave(m), reduction="none")
        fewer = fewer.view(n, m)
        if self.detach_fewer:
            fewer = fewer.detach()
        return torch.clamp(more.unsqueeze(1) - fewer + self.margin, min=0.0).mean()
