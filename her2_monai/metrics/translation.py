"""Stain-translation quality with the BCI convention (uint8 RGB, skimage PSNR with data range 255, SSIM)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from einops import rearrange
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["to_uint8_images", "psnr_ssim", "TranslationMetric", "CONVENTION"]

#: Printed into every report: published numbers differ by about 3 dB with these choices.
CONVENTION = (
    "uint8 RGB; skimage peak_signal_noise_ratio(data_range=255) and structural_similarity(channel_axis=-1, default "
    "window); mean over images; generators in eval mode"
)


def to_uint8_images(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Network images to displayable ones: the one ``[-1, 1]`` -> uint8 RGB conversion of the package.

    ``round((clamp(x, -1, 1) + 1) * 127.5)``, rounding half to even like an image writer would; computed in float32
    (float64 input stays float64), so half-precision network outputs convert like float32 ones.

    Args:
        x: ``(B, 3, H, W)`` in ``[-1, 1]``, tensor or array.

    Returns:
        ``(B, H, W, 3)`` uint8.
    """
    x = torch.as_tensor(x).detach()
    x = x if x.dtype == torch.float64 else x.float()
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(array, "b c h w -> b h w c").cpu().numpy()


def psnr_ssim(fake: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM of one uint8 ``(H, W, 3)`` image pair."""
    psnr = peak_signal_noise_ratio(real, fake, data_range=255)
    ssim = structural_similarity(real, fake, channel_axis=-1, data_range=255)
    return float(min(psnr, 100.0)), float(ssim)


class TranslationMetric(Metric):
    """Mean PSNR or SSIM of one translation direction over all images, from :class:`TranslationEvaluator` outputs.

    Args:
        direction: ``"he_to_ihc"`` (compares ``fake_ihc`` with ``ihc``) or ``"ihc_to_he"``.
        kind: ``"psnr"`` or ``"ssim"``.
        output_transform: ignite output transform.

    Raises:
        ValueError: for an unknown direction or kind.
    """

    _PAIRS = {"he_to_ihc": ("fake_ihc", "ihc"), "ihc_to_he": ("fake_he", "he")}
    required_output_keys = ("fake_ihc", "ihc", "fake_he", "he")

    def __init__(self, direction: str = "he_to_ihc", kind: str = "psnr", output_transform: Any = lambda x: x) -> None:
        if direction not in self._PAIRS or kind not in ("psnr", "ssim"):
            raise ValueError(f"direction must be one of {list(self._PAIRS)} and kind 'psnr' or 'ssim'")
        self.direction, self.kind = direction, kind
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, ...]) -> None:
        named = dict(zip(self.required_output_keys, output))
        fake_key, real_key = self._PAIRS[self.direction]
        fakes, reals = to_uint8_images(named[fake_key]), to_uint8_images(named[real_key])
        for fake, real in zip(fakes, reals):
            self._sum += psnr_ssim(fake, real)[0 if self.kind == "psnr" else 1]
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if self._count > 0 else float("nan")
