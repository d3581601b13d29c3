"""GAN objective for the conditional PatchGAN of the CM-GAN (vanilla or least-squares)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GANLoss"]

_MODES = ("vanilla", "lsgan")


class GANLoss(nn.Module):
    """pix2pix GAN loss on raw discriminator logits, with the discriminator loss halved.

    Modes:
        - ``"vanilla"`` (default, the paper's choice): binary cross-entropy with logits against a constant target map.
        - ``"lsgan"``: mean squared error between the raw logits and the target value (Mao et al., as in pix2pix).

    The discriminator loss is ``d_loss_scale * (loss(D(real), real_target) + loss(D(fake), fake_target))`` with
    ``d_loss_scale = 0.5`` (pix2pix halves it so that D learns slower than G); the generator loss is
    ``loss(D(fake), real_target)``. Losses are averaged over every patch logit and computed in fp32 even under autocast.

    Why not :class:`monai.losses.PatchAdversarialLoss`: its ``"bce"`` criterion applies a sigmoid followed by
    ``BCELoss``, which clamps ``log`` at -100 (a saturated discriminator then gives a constant loss of 100 with no
    gradient, where BCE-with-logits keeps growing linearly) and which CUDA autocast refuses as unsafe; its
    ``"least_squares"`` criterion puts a LeakyReLU(0.05) on the logits unless ``no_activation_leastsq=True``; and it
    does not take the target values or the halved discriminator convention as arguments. With matching settings both
    give the same values for moderate logits (checked in the tests).

    Args:
        mode: ``"vanilla"`` or ``"lsgan"``.
        target_real: target value for real patches (e.g. 0.9 for one-sided label smoothing).
        target_fake: target value for fake patches.
        d_loss_scale: factor applied to the summed real and fake discriminator terms.

    Raises:
        ValueError: for an unknown ``mode`` or vanilla targets outside [0, 1].
    """

    def __init__(
        self, mode: str = "vanilla", target_real: float = 1.0, target_fake: float = 0.0, d_loss_scale: float = 0.5
    ) -> None:
        super().__init__()
        mode = str(mode).lower()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got '{mode}'")
        if mode == "vanilla" and not (0.0 <= target_real <= 1.0 and 0.0 <= target_fake <= 1.0):
            raise ValueError(
                f"vanilla (BCE) targets must lie in [0, 1], got target_real={target_real}, target_fake={target_fake}"
            )
        self.mode = mode
        self.target_real = float(target_real)
        self.target_fake = float(target_fake)
        self.d_loss_scale = float(d_loss_scale)

    def forward(self, pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        """Loss of discriminator logits against the real or the fake target.

        Args:
            pred: raw discriminator logits, any shape, e.g. ``(B, 1, h, w)``.
            target_is_real: whether the target is "real" (``target_real``) or "fake" (``target_fake``).

        Returns:
            Scalar loss averaged over all logits.
        """
        pred = pred.float()
        target = torch.full_like(pred, self.target_real if target_is_real else self.target_fake)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            if self.mode == "vanilla":
                return F.binary_cross_entropy_with_logits(pred, target)
            return F.mse_loss(pred, target)

    def discriminator_loss(self, pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
        """Discriminator objective ``d_loss_scale * (loss(pred_real, real) + loss(pred_fake, fake))``.

        Args:
            pred_real: logits of D on (source, real target) pairs.
            pred_fake: logits of D on (source, generated target) pairs; pass the generated image detached.

        Returns:
            Scalar loss.
        """
        return self.d_loss_scale * (self(pred_real, True) + self(pred_fake, False))

    def generator_loss(self, pred_fake: torch.Tensor) -> torch.Tensor:
        """Generator adversarial objective: make D call the generated pairs real.

        Args:
            pred_fake: logits of D on (source, generated target) pairs, not detached.

        Returns:
            Scalar loss.
        """
        return self(pred_fake, True)
