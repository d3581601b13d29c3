"""Modality-sensitive attention: CBAM-style channel and spatial attention over the fused features of all stains.

CBAM (Woo et al., ECCV'18) reweights channels with ``sigmoid(MLP(avgpool) + MLP(maxpool))`` and then positions with
``sigmoid(conv7x7([max_c, mean_c]))``. MONAI has squeeze-and-excitation (``ChannelSELayer``: average pooling only) and
self-attention blocks but no CBAM, so the two parts are written here. The MM'25 framework applies it to the
concatenated fused (shared + specific) features of both stains after a 1x1 compression; the channel weights are an
output, and their mean over each stain's channel block says how much the classifier relies on that stain.
"""

from __future__ import annotations

import torch
from einops import reduce
from torch import nn

__all__ = ["ChannelAttention", "SpatialAttention", "ModalitySensitiveAttention"]


class ChannelAttention(nn.Module):
    """CBAM channel attention: ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one MLP shared by both pools.

    Args:
        channels: input channels ``C``.
        reduction: hidden width of the MLP is ``max(C // reduction, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights.

        Args:
            x: ``(B, C, h, w)``.

        Returns:
            ``(B, C)`` weights in ``(0, 1)``.
        """
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx)).flatten(1)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``sigmoid(conv([max over channels, mean over channels]))``.

    Args:
        kernel_size: odd kernel size of the convolution (7 in CBAM).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial weights.

        Args:
            x: ``(B, C, h, w)``.

        Returns:
            ``(B, 1, h, w)`` weights in ``(0, 1)``.
        """
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ModalitySensitiveAttention(nn.Module):
    """1x1 compression of each stain's fused features, then CBAM channel and (optional) spatial attention.

    The compression is a grouped 1x1 ``Conv-BN-ReLU`` (one group per stain), so channel block ``i`` of the
    compressed map still belongs to stain ``i`` alone; a dense 1x1 convolution would mix the stains and make the
    per-stain attention (:meth:`stain_weights`) meaningless. Channel attention then sees all stains' channels at
    once, so it can rank one stain's channels against the other's; spatial attention is applied after it, as in CBAM.

    Args:
        in_channels: fused feature width of one stain.
        num_stains: number of stains concatenated along channels.
        compressed_channels: width of each stain's block after compression.
        reduction: channel-attention MLP reduction (16 in CBAM and MM'25).
        spatial_attention: apply spatial attention after channel attention.
        spatial_kernel_size: kernel of the spatial-attention convolution.
        channel_attention: apply channel attention (``False``, with ``spatial_attention=False``, is the ablation
            without modality attention: the stains' compressed features are concatenated with weight 1).
    """

    def __init__(
        self,
        in_channels: int,
        num_stains: int = 2,
        compressed_channels: int = 256,
        reduction: int = 16,
        spatial_attention: bool = True,
        spatial_kernel_size: int = 7,
        channel_attention: bool = True,
    ) -> None:
        super().__init__()
        self.num_stains = num_stains
        self.in_channels = in_channels
        self.out_channels = num_stains * compressed_channels
        self.compress = nn.Sequential(
            nn.Conv2d(num_stains * in_channels, self.out_channels, kernel_size=1, groups=num_stains, bias=False),
            nn.BatchNorm2d(self.out_channels),
            nn.ReLU(inplace=True),
        )
        self.channel = ChannelAttention(self.out_channels, reduction) if channel_attention else None
        self.spatial = SpatialAttention(spatial_kernel_size) if spatial_attention else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Attend.

        Args:
            x: ``(B, num_stains * in_channels, h, w)``: the stains' fused maps concatenated in stain order.

        Returns:
            ``(features, channel_weights, spatial_weights)``: ``(B, out_channels, h, w)``, ``(B, out_channels)`` and
            ``(B, 1, h, w)`` (``None`` without spatial attention); weights in ``(0, 1)``.

        Raises:
            ValueError: if ``x`` does not have ``num_stains * in_channels`` channels.
        """
        expected = self.num_stains * self.in_channels
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(
                f"expected ({self.num_stains} stains x {self.in_channels} channels = {expected}) channels in a "
                f"(B, C, h, w) map, got {tuple(x.shape)}"
            )
        x = self.compress(x)
        if self.channel is None:
            channel_weights = x.new_ones((x.shape[0], self.out_channels))
        else:
            channel_weights = self.channel(x)
            x = x * channel_weights[:, :, None, None]
        spatial_weights = None
        if self.spatial is not None:
            spatial_weights = self.spatial(x)
            x = x * spatial_weights
        return x, channel_weights, spatial_weights

    def stain_weights(self, channel_weights: torch.Tensor) -> torch.Tensor:
        """Mean channel weight of each stain's channel block.

        Args:
            channel_weights: ``(B, out_channels)`` from :meth:`forward`.

        Returns:
            ``(B, num_stains)``.
        """
        return reduce(channel_weights, "b (stain c) -> b stain", "mean", stain=self.num_stains)
