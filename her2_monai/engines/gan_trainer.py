"""Stage 1: training both CM-GAN directions (H&E -> IHC and IHC -> H&E) with MONAI's engine machinery."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from her2_monai.constants import HE_KEY, IHC_KEY, MASK_KEY
from her2_monai.engines.base import AmpTrainer
from her2_monai.engines.distributed import wrap_ddp
from her2_monai.losses.adversarial import GANLoss
from her2_monai.losses.pyramid import PyramidL1Loss
from her2_monai.networks.cmgan import CrossModalDiscriminators, CrossModalGAN
from her2_monai.stain_batch import autocast, prepare_stain_batch
from her2_monai.utils import as_bool

__all__ = ["CrossModalGANTrainer"]

_GENERATORS = ("he_to_ihc", "ihc_to_he")
_DISCRIMINATORS = ("disc_ihc", "disc_he")


class CrossModalGANTrainer(AmpTrainer):
    """Conditional pix2pix training of both translation directions of a :class:`CrossModalGAN`.

    MONAI's ``AdversarialTrainer`` shows its discriminator the generated images alone; a conditional PatchGAN must see
    ``(source, target)`` pairs, so this trainer subclasses :class:`monai.engines.Trainer` (through :class:`AmpTrainer`)
    with its own iteration, the pattern of MONAI model-zoo's detection and VAE-GAN trainers. Each iteration, on the
    samples that have both stains:

    1. generate ``fake_ihc = he_to_ihc(he)`` and ``fake_he = ihc_to_he(ihc)``;
    2. discriminator step: ``d_loss = D_loss(disc_ihc, [he, ihc] vs [he, fake_ihc]) + D_loss(disc_he, ...)`` (each
       halved, see :class:`GANLoss`);
    3. generator step (discriminators frozen): adversarial term plus the pyramid L1 terms for both directions.

    **Multi-GPU** (``distributed=True``): the iteration calls the four networks one by one, so wrapping the whole
    CrossModalGAN in ``DistributedDataParallel`` would synchronise nothing (DDP only acts inside its own ``forward``).
    Each generator and discriminator is instead wrapped in its own DDP (gradients averaged over processes in each
    backward, BatchNorm buffers broadcast from rank 0 at each forward), while ``network`` and ``discriminators``
    themselves stay unwrapped, so checkpoints, the exported generators and the evaluator see the plain modules and
    the same state-dict keys as a single-process run. In the generator step the discriminators are called
    unwrapped: their parameters are frozen there, and a DDP forward would wait for gradients that never come.

    Per-iteration output (logged by MONAI/MLflow handlers): ``g_loss``, ``d_loss``, ``g_adv``, and every pyramid term
    per direction (e.g. ``ihc_l1_full``, ``ihc_l1_half``, ``he_l1_full``...), plus detached image tensors under
    ``images`` for image-grid handlers.

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: loader of records with both stains (others are ignored batch-wise).
        network: the :class:`CrossModalGAN` (the two generators).
        discriminators: the :class:`CrossModalDiscriminators` that judge them.
        g_optimizer: optimizer over ``network.parameters()``.
        d_optimizer: optimizer over ``discriminators.parameters()``.
        pyramid_loss: reconstruction loss (default: full + 1/2 levels, weight 25 each).
        gan_loss: adversarial loss (default vanilla, discriminator loss halved).
        amp: mixed precision (float16 + gradient scaling on CUDA, bfloat16 on CPU).
        channels_last: channels-last memory format for inputs.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        train_handlers: MONAI/ignite handlers to attach.
        distributed: wrap each generator and discriminator in ``DistributedDataParallel`` (a process group must be
            initialised; use a ``DistributedSampler`` so that processes see different samples).
        ddp_kwargs: extra ``DistributedDataParallel`` arguments.
        kwargs: passed on to :class:`monai.engines.Trainer` (e.g. ``key_train_metric``).

    Raises:
        RuntimeError: if ``distributed`` is set without an initialised process group.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: CrossModalGAN,
        discriminators: CrossModalDiscriminators,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        pyramid_loss: PyramidL1Loss | None = None,
        gan_loss: GANLoss | None = None,
        amp: bool = False,
        channels_last: bool = False,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        distributed: bool = False,
        ddp_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, amp, epoch_length, train_handlers, **kwargs)
        self.network = network
        self.discriminators = discriminators
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.pyramid_loss = pyramid_loss if pyramid_loss is not None else PyramidL1Loss()
        self.gan_loss = gan_loss if gan_loss is not None else GANLoss()
        self.channels_last = as_bool(channels_last, "channels_last")
        self.distributed = bool(distributed)
        self.nets: dict[str, torch.nn.Module] = {name: getattr(network, name) for name in _GENERATORS}
        self.nets.update({name: getattr(discriminators, name) for name in _DISCRIMINATORS})
        if self.distributed:
            self.nets = {name: wrap_ddp(m, device, **(ddp_kwargs or {})) for name, m in self.nets.items()}

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_stain_batch(batchdata, engine.state.device, self.channels_last, engine.non_blocking)
        dual = (batch[MASK_KEY] > 0).all(dim=1)
        if not bool(dual.any()):
            return {"g_loss": float("nan"), "d_loss": float("nan"), "skipped": True}
        he, ihc = batch[HE_KEY][dual], batch[IHC_KEY][dual]
        discs, nets = self.discriminators, self.nets  # nets: the same modules, DDP-wrapped when distributed
        self.network.train()
        discs.train()

        with autocast(engine.state.device, self.amp):
            fake_ihc = nets["he_to_ihc"](he)
            fake_he = nets["ihc_to_he"](ihc)

        # Discriminator step on detached fakes.
        discs.set_trainable(True)
        with autocast(engine.state.device, self.amp):
            d_ihc = self.gan_loss.discriminator_loss(
                nets["disc_ihc"](torch.cat([he, ihc], 1)), nets["disc_ihc"](torch.cat([he, fake_ihc.detach()], 1))
            )
            d_he = self.gan_loss.discriminator_loss(
                nets["disc_he"](torch.cat([ihc, he], 1)), nets["disc_he"](torch.cat([ihc, fake_he.detach()], 1))
            )
            d_loss = d_ihc + d_he
        self.optimizer_step(self.d_optimizer, d_loss)

        # Generator step: the discriminators only pass gradients through (unwrapped under DDP: nothing to sync).
        discs.set_trainable(False)
        with autocast(engine.state.device, self.amp):
            g_adv = self.gan_loss.generator_loss(discs.disc_ihc(torch.cat([he, fake_ihc], 1)))
            g_adv = g_adv + self.gan_loss.generator_loss(discs.disc_he(torch.cat([ihc, fake_he], 1)))
        terms_ihc = self.pyramid_loss.terms(fake_ihc.float(), ihc)
        terms_he = self.pyramid_loss.terms(fake_he.float(), he)
        g_loss = g_adv + sum(terms_ihc.values()) + sum(terms_he.values())
        self.optimizer_step(self.g_optimizer, g_loss)
        discs.set_trainable(True)

        output: dict[str, Any] = {
            "g_loss": g_loss.item(),
            "d_loss": d_loss.item(),
            "g_adv": g_adv.item(),
            "d_ihc": d_ihc.item(),
            "d_he": d_he.item(),
        }
        output.update({f"ihc_{k}": v.item() for k, v in terms_ihc.items()})
        output.update({f"he_{k}": v.item() for k, v in terms_he.items()})
        output["images"] = {
            "he": he.detach()[:4],
            "ihc": ihc.detach()[:4],
            "fake_ihc": fake_ihc.detach().float()[:4],
            "fake_he": fake_he.detach().float()[:4],
        }
        return output
