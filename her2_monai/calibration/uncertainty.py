"""MC-dropout uncertainty (Gal & Ghahramani, ICML 2016): predictive entropy and mutual information.

The classifier's only dropout layer is ``HER2FlexibleNet.head.dropout``
(:class:`~her2_monai.networks.her2net.DualPoolHead`, p = 0.3), between the pooled embedding and the final linear
layer; the encoders (ResNet; EfficientNet, whose drop-connect is off in eval mode), the fusion and the attention have
none, and the frozen CM-GAN generators' dropout is not sampled (they stay in eval mode: the synthetic stain is
deterministic). So an MC-dropout pass only re-runs the head on the ``embedding`` output: ``T`` passes cost ``T``
small matrix products, not ``T`` network forwards.

For ``T`` sampled probability vectors ``p_t``: predictive entropy ``H[mean_t p_t]`` (total uncertainty); mutual
information ``H[mean_t p_t] - mean_t H[p_t]`` (the part due to the weights, "epistemic").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["entropy", "dropout_head", "mc_dropout_head"]


def dropout_head(network: nn.Module) -> nn.Module | None:
    """The network's head when MC dropout can sample it on the ``embedding`` output, else ``None``.

    That is a head with ``dropout`` and ``fc`` (:class:`~her2_monai.networks.her2net.DualPoolHead`) or a
    ``Sequential(Dropout, Linear)`` (MoRA); a network without one head over its embedding (the stain specialists,
    SimMLM's gated experts) has no head to sample.
    """
    head = getattr(network, "head", None)
    if head is None:
        return None
    if isinstance(getattr(head, "dropout", None), nn.Dropout) and isinstance(getattr(head, "fc", None), nn.Linear):
        return head
    if isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], nn.Dropout):
        if isinstance(head[1], nn.Linear):
            return head
    return None


def _parts(head: nn.Module) -> tuple[float, nn.Module]:
    if isinstance(head, nn.Sequential):
        return float(head[0].p), head[1]
    return float(head.dropout.p), head.fc


def entropy(probabilities: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim`` (``0 log 0 = 0``)."""
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=dim)


@torch.no_grad()
def mc_dropout_head(
    head: nn.Module,
    embedding: Tensor,
    passes: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Sample the head's dropout ``passes`` times on fixed embeddings.

    Args:
        head: a head accepted by :func:`dropout_head` (dropout, then a linear layer).
        embedding: ``(B, D)`` pooled features (the network's ``embedding`` output).
        passes: number of samples ``T >= 1``.
        temperature: the calibration temperature applied to every sampled logit.
        generator: random generator of the dropout masks (reproducible runs).

    Returns:
        ``probabilities`` ``(B, C)`` (mean over passes), ``entropy`` ``(B,)`` and ``mutual_information`` ``(B,)``.

    Raises:
        ValueError: for ``passes < 1``.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    p, fc = _parts(head)
    embedding = embedding.float()
    samples = []
    for _ in range(passes):
        keep = torch.rand(embedding.shape, generator=generator, device="cpu").to(embedding.device) >= p
        dropped = embedding * keep / (1.0 - p) if p > 0 else embedding
        samples.append(F.softmax(fc(dropped).float() / temperature, dim=-1))
    stacked = torch.stack(samples)  # (T, B, C)
    mean = stacked.mean(dim=0)
    total = entropy(mean)
    return {
        "probabilities": mean,
        "entropy": total,
        "mutual_information": (total - entropy(stacked).mean(dim=0)).clamp_min(0.0),
    }
