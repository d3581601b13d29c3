"""Cross-modal GAN (CM-GAN): two Pyramid-Pix2Pix generators that fill in a missing H&E or IHC image."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from her2_monai.networks.pix2pix import PatchGANDiscriminator, PyramidPix2PixGenerator
from her2_monai.networks.record import RecordedNetwork
from her2_monai.stain_batch import check_stain_inputs

__all__ = ["CrossModalGAN", "CrossModalDiscriminators"]


class CrossModalGAN(RecordedNetwork, nn.Module):
    """H&E -> IHC and IHC -> H&E translators, trained first (stage 1), then frozen inside the classifier (stage 2).

    Submodules ``he_to_ihc`` and ``ihc_to_he`` (:class:`PyramidPix2PixGenerator`). The discriminators that train them
    are a separate module (:class:`CrossModalDiscriminators`), so the stage-1 output file ``cmgan.pt`` is exactly this
    module's state dict, architecture record included (:class:`~her2_monai.networks.record.RecordedNetwork`).

    After :meth:`freeze`, every parameter has ``requires_grad=False``, the module stays in eval mode even when a parent
    calls ``.train()`` (BatchNorm statistics and dropout stay fixed), and :meth:`synthesize` runs under
    ``torch.no_grad()``. Calling ``requires_grad_(True)`` on a parent would undo the first part; filter optimizer
    parameters on ``requires_grad`` instead.

    Args:
        channels: image channels of both stains (3 for RGB).
        ngf: generator width.
        n_blocks: residual blocks per generator.
        norm: generator normalisation, ``"batch"`` or ``"instance"``.
        use_dropout: dropout in the generators' residual blocks.
        dropout_p: that dropout's probability.
        metadata: facts about the training run saved with the weights (e.g. the image size).
    """

    def __init__(
        self,
        channels: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: str = "batch",
        use_dropout: bool = True,
        dropout_p: float = 0.5,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        arguments = {
            "channels": channels,
            "ngf": ngf,
            "n_blocks": n_blocks,
            "norm": norm,
            "use_dropout": use_dropout,
            "dropout_p": dropout_p,
        }
        gen_kwargs = {
            "in_channels": channels,
            "out_channels": channels,
            "ngf": ngf,
            "n_blocks": n_blocks,
            "norm": norm,
            "use_dropout": use_dropout,
            "dropout_p": dropout_p,
        }
        self.channels = channels
        self.he_to_ihc = PyramidPix2PixGenerator(**gen_kwargs)
        self.ihc_to_he = PyramidPix2PixGenerator(**gen_kwargs)
        self._frozen = False
        self.record_architecture(metadata, **arguments)

    # ------------------------------------------------------------------------------------------------- freezing
    @property
    def is_frozen(self) -> bool:
        """Whether :meth:`freeze` was called (and not undone by :meth:`unfreeze`)."""
        return self._frozen

    def freeze(self) -> CrossModalGAN:
        """Fix all weights and statistics: ``requires_grad=False``, eval mode, kept in eval by :meth:`train`.

        Returns:
            ``self``.
        """
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.train(False)

    def unfreeze(self) -> CrossModalGAN:
        """Undo :meth:`freeze` (parameters trainable again); the train/eval mode is left as it is.

        Returns:
            ``self``.
        """
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self

    def train(self, mode: bool = True) -> CrossModalGAN:
        """Set train/eval mode; a frozen CM-GAN always stays in eval mode.

        Args:
            mode: requested mode; ignored (eval) while frozen.

        Returns:
            ``self``.
        """
        return super().train(bool(mode) and not self._frozen)

    # ---------------------------------------------------------------------------------------------- synthesis
    def synthesize(
        self, he: torch.Tensor | None, ihc: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill in the missing stain of each sample; available stains pass through bit for bit.

        A sample without H&E (``mask[i, 0] == 0``) gets ``ihc_to_he(ihc[i])``; one without IHC gets
        ``he_to_ihc(he[i])``. Each generator runs once, on the subset of samples that need it (none -> not run), so
        a dual-stain batch costs nothing. The values in a missing slot (zeros by convention) are ignored.
        Note that an unfrozen generator in train mode normalises with the statistics of that subset.

        Args:
            he: H&E images ``(B, C, H, W)`` in [-1, 1], or ``None`` if no sample has H&E.
            ihc: IHC images ``(B, C, H, W)`` in [-1, 1], or ``None`` if no sample has IHC.
            mask: availability ``(B, 2)``, 0/1; column 0 = H&E, column 1 = IHC.

        Returns:
            ``(he_filled, ihc_filled)``, each ``(B, C, H, W)``.

        Raises:
            ValueError: for an invalid batch (see :func:`~her2_monai.stain_batch.check_stain_inputs`).
        """
        he_out, ihc_out, available = check_stain_inputs(he, ihc, mask, self.channels)
        need_he = (~available[:, 0]).nonzero().flatten()
        need_ihc = (~available[:, 1]).nonzero().flatten()
        grad_ctx = torch.no_grad() if self._frozen else contextlib.nullcontext()
        with grad_ctx:
            # Sources are read from the inputs before either output is modified: a generated stain never feeds a
            # generator (a sample lacking one stain always has the other).
            fake_he = self.ihc_to_he(ihc_out.index_select(0, need_he)) if need_he.numel() else None
            fake_ihc = self.he_to_ihc(he_out.index_select(0, need_ihc)) if need_ihc.numel() else None
            if fake_he is not None:
                he_out = he_out.index_copy(0, need_he, fake_he.to(he_out.dtype))
            if fake_ihc is not None:
                ihc_out = ihc_out.index_copy(0, need_ihc, fake_ihc.to(ihc_out.dtype))
        return he_out, ihc_out

    def synthesize_dense(
        self, he: torch.Tensor, ihc: torch.Tensor, available: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`synthesize` without data-dependent subsets, for ``torch.jit.trace``: both generators run on the
        whole batch and the real stain is kept per sample (the same result for a frozen, eval-mode CM-GAN).

        Args:
            he: ``(B, C, H, W)``.
            ihc: ``(B, C, H, W)``.
            available: ``(B, 2)`` bool.

        Returns:
            ``(he_filled, ihc_filled)``.
        """
        grad_ctx = torch.no_grad() if self._frozen else contextlib.nullcontext()
        with grad_ctx:
            fake_he = self.ihc_to_he(ihc).to(he.dtype)
            fake_ihc = self.he_to_ihc(he).to(ihc.dtype)
        he_in = torch.where(available[:, 0, None, None, None], he, fake_he)
        ihc_in = torch.where(available[:, 1, None, None, None], ihc, fake_ihc)
        return he_in, ihc_in

    def forward(
        self, he: torch.Tensor | None, ihc: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`synthesize`."""
        return self.synthesize(he, ihc, mask)


class CrossModalDiscriminators(nn.Module):
    """The two conditional PatchGAN discriminators that train a :class:`CrossModalGAN` (stage 1 only).

    ``disc_ihc`` judges ``cat([he, ihc])`` pairs (real, or with the IHC made by ``he_to_ihc``); ``disc_he`` judges
    ``cat([ihc, he])`` pairs.

    Args:
        channels: image channels per stain.
        ndf: discriminator width.
        n_layers: discriminator depth (3 = 70x70 PatchGAN).
        norm: discriminator normalisation.
    """

    def __init__(self, channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        kwargs = {"in_channels": 2 * channels, "ndf": ndf, "n_layers": n_layers, "norm": norm}
        self.disc_ihc = PatchGANDiscriminator(**kwargs)
        self.disc_he = PatchGANDiscriminator(**kwargs)

    def set_trainable(self, flag: bool) -> None:
        """Switch ``requires_grad`` of every parameter (off while the generators' loss passes through)."""
        for p in self.parameters():
            p.requires_grad_(flag)
