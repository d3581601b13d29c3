"""Pyramid-Pix2Pix generator and conditional PatchGAN discriminator for the cross-modal GAN (CM-GAN).

The generator is the ResNet-9-blocks translator of pix2pix/CycleGAN as used by BCI's PyramidPix2pix; the
discriminator is the conditional 70x70 PatchGAN, built on :class:`monai.networks.nets.PatchDiscriminator`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import PatchDiscriminator
from monai.networks.utils import normal_init

__all__ = ["PyramidPix2PixGenerator", "PatchGANDiscriminator", "ResnetBlock", "get_norm_layer"]

_NORMS = ("batch", "instance")


def _check_norm(norm: str) -> str:
    key = str(norm).lower()
    if key not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got '{norm}'")
    return key


def get_norm_layer(norm: str, channels: int) -> nn.Module:
    """Return the 2D normalisation layer used by pix2pix.

    Args:
        norm: ``"batch"`` (affine BatchNorm with running statistics, pix2pix's default) or ``"instance"`` (InstanceNorm
            without affine parameters or running statistics, CycleGAN's default).
        channels: number of feature channels.

    Returns:
        The normalisation module.

    Raises:
        ValueError: if ``norm`` is not supported.
    """
    if _check_norm(norm) == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """Residual block ``x + [conv3x3 -> norm -> ReLU -> (dropout) -> conv3x3 -> norm](x)`` with reflection padding.

    Args:
        channels: number of input and output channels.
        norm: ``"batch"`` or ``"instance"``.
        use_dropout: whether to apply dropout between the two convolutions (pix2pix uses it, CycleGAN does not).
        dropout_p: dropout probability.
    """

    def __init__(self, channels: int, norm: str = "batch", use_dropout: bool = True, dropout_p: float = 0.5) -> None:
        super().__init__()
        # A normalisation layer with its own shift makes a conv bias redundant; InstanceNorm here has no affine shift.
        bias = _check_norm(norm) == "instance"
        layers: list[nn.Module] = [
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias),
            get_norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(dropout_p))
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias),
            get_norm_layer(norm, channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: features ``(B, C, H, W)``.

        Returns:
            Features ``(B, C, H, W)``.
        """
        return x + self.block(x)


class PyramidPix2PixGenerator(nn.Module):
    """ResNet-9-blocks image-to-image generator (pix2pix / BCI PyramidPix2pix).

    Layout: 7x7 conv (reflection padding) -> 2 stride-2 3x3 convs (ngf -> 2 ngf -> 4 ngf) -> ``n_blocks`` residual
    blocks at 4 ngf -> 2 stride-2 3x3 transposed convs back to ngf -> 7x7 conv (reflection padding) -> tanh. Each conv
    but the last is followed by the normalisation and ReLU. Weights are initialised from N(0, 0.02) (norm scales from
    N(1, 0.02)) as in pix2pix, via :func:`monai.networks.utils.normal_init`.

    Parameter counts for 3 -> 3 channels and the default ngf 64, 9 blocks: 11,378,179 with ``norm="instance"``
    (the figure pix2pix/CycleGAN print for ``resnet_9blocks``) and 11,383,427 with ``norm="batch"`` (each BatchNorm
    adds an affine weight and bias but removes the conv bias before it: +5,248).

    Reflection padding is expressed as ``nn.Conv2d(padding_mode="reflect")``, which computes the same thing as a
    separate ``nn.ReflectionPad2d`` followed by an unpadded conv.

    Args:
        in_channels: channels of the source image.
        out_channels: channels of the generated image.
        ngf: filters of the first conv layer.
        n_blocks: number of residual blocks.
        norm: ``"batch"`` (default, as in the paper) or ``"instance"``.
        use_dropout: dropout inside the residual blocks (pix2pix default: on).
        dropout_p: dropout probability.

    Raises:
        ValueError: for a non-positive ``ngf``/``in_channels``/``out_channels``, a negative ``n_blocks`` or an
            unknown ``norm``.
    """

    #: spatial size must be a multiple of this (two stride-2 downsamplings followed by two 2x upsamplings).
    size_divisor: int = 4

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: str = "batch",
        use_dropout: bool = True,
        dropout_p: float = 0.5,
    ) -> None:
        super().__init__()
        if min(in_channels, out_channels, ngf) < 1:
            raise ValueError(
                f"in_channels, out_channels and ngf must be positive, got {in_channels}, {out_channels}, {ngf}"
            )
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        norm = _check_norm(norm)
        self.in_channels = in_channels
        self.out_channels = out_channels
        bias = norm == "instance"

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ngf, 7, padding=3, padding_mode="reflect", bias=bias),
            get_norm_layer(norm, ngf),
            nn.ReLU(inplace=True),
        ]
        channels = ngf
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=bias),
                get_norm_layer(norm, channels * 2),
                nn.ReLU(inplace=True),
            ]
            channels *= 2
        layers += [
            ResnetBlock(channels, norm=norm, use_dropout=use_dropout, dropout_p=dropout_p) for _ in range(n_blocks)
        ]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                get_norm_layer(norm, channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [nn.Conv2d(channels, out_channels, 7, padding=3, padding_mode="reflect"), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.apply(normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate a batch of images.

        Args:
            x: source images ``(B, in_channels, H, W)`` in [-1, 1]; ``H`` and ``W`` multiples of 4 (and large enough
                for the 3-pixel reflection padding, i.e. at least 4).

        Returns:
            Generated images ``(B, out_channels, H, W)`` in [-1, 1].

        Raises:
            ValueError: if ``x`` is not 4D, has the wrong channel count, or H/W are not multiples of 4.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PyramidPix2PixGenerator expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(
                f"PyramidPix2PixGenerator needs H and W divisible by {self.size_divisor} "
                f"(two stride-2 down- and upsamplings), got H={h}, W={w}"
            )
        return self.model(x)


class PatchGANDiscriminator(PatchDiscriminator):
    """Conditional 70x70 PatchGAN discriminator (pix2pix), a configured :class:`monai.networks.nets.PatchDiscriminator`.

    MONAI's class matches pix2pix's ``NLayerDiscriminator`` exactly when configured as here: 4x4 kernels, padding 1,
    a first conv (stride 2, bias, no normalisation, LeakyReLU 0.2), then ``n_layers`` conv-norm-LeakyReLU blocks with
    strides 2, ..., 2, 1 and channels doubling from ``ndf`` (pix2pix caps the width at 8 ndf, which only matters
    for ``n_layers > 3``, so deeper configurations are refused), and a final 4x4 stride-1 conv to one logit map with
    bias. Conv biases in the normalised blocks follow pix2pix: off with BatchNorm (its shift makes them redundant), on
    with InstanceNorm (no affine shift). Weights come from N(0, 0.02), as in pix2pix. With the defaults (6 input
    channels = source and target concatenated, ndf 64, BatchNorm) it has 2,768,705 parameters (pix2pix prints
    2.769 M); the receptive field of one output logit is 70x70 pixels.

    MONAI's ``forward`` returns the list of all intermediate features; this subclass returns only the final logit
    map (use :meth:`features` for the list, e.g. for a feature-matching loss).

    Args:
        in_channels: channels of the concatenated (source, target) input.
        ndf: filters of the first conv layer.
        n_layers: number of normalised conv blocks (3 gives the 70x70 PatchGAN; at most 3, see above).
        norm: ``"batch"`` (default) or ``"instance"``.

    Raises:
        ValueError: for an unknown ``norm``, ``n_layers`` outside 1..3 or non-positive channel counts.
    """

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        norm = _check_norm(norm)
        if not 1 <= n_layers <= 3:
            raise ValueError(
                f"n_layers must be in 1..3 (MONAI's PatchDiscriminator does not cap the width at 8*ndf), got {n_layers}"
            )
        if min(in_channels, ndf) < 1:
            raise ValueError(f"in_channels and ndf must be positive, got {in_channels}, {ndf}")
        monai_norm: str | tuple = "BATCH" if norm == "batch" else ("INSTANCE", {"affine": False})
        super().__init__(
            spatial_dims=2,
            channels=ndf,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=n_layers,
            kernel_size=4,
            norm=monai_norm,
            bias=norm == "instance",
            padding=1,
            last_conv_kernel_size=4,
        )
        self.in_channels = in_channels
        self.n_layers = n_layers

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchGANDiscriminator expects (B, {self.in_channels}, H, W) = source and target concatenated on "
                f"the channel axis, got {tuple(x.shape)}"
            )
        # n_layers stride-2 4x4 convs (padding 1) halve the size; the two stride-1 4x4 convs each remove one pixel.
        min_size = 3 * 2**self.n_layers
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"PatchGANDiscriminator needs H, W >= {min_size}, got {tuple(x.shape[-2:])}")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return every block's output, the last being the logit map (MONAI's original ``forward``).

        Args:
            x: ``(B, in_channels, H, W)``.

        Returns:
            List of feature maps; the last is ``(B, 1, h, w)``.
        """
        self._check_input(x)
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Score every 70x70 patch as real or fake.

        Args:
            x: ``(B, in_channels, H, W)``, typically ``torch.cat([source, target], dim=1)``.

        Returns:
            Raw logits ``(B, 1, h, w)`` (no sigmoid; the GAN loss applies it). For 256x256 input and the defaults,
            ``h = w = 30``.
        """
        self._check_input(x)
        out = x
        for layer in self.children():
            out = layer(out)
        return out
