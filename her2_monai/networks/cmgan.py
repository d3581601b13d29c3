"""Cross-modal GAN (CM-GAN): two Pyramid-Pix2Pix generators that fill in a missing H&E or IHC image."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from her2_monai.networks.pix2pix import PatchGANDiscriminator, PyramidPix2PixGenerator

__all__ = ["CrossModalGAN"]

_GENERATORS = ("he_to_ihc", "ihc_to_he")
_DISCRIMINATORS = ("disc_ihc", "disc_he")


class CrossModalGAN(nn.Module):
    """H&E -> IHC and IHC -> H&E translators, trained first (stage 1), then frozen inside the classifier (stage 2).

    Submodules: ``he_to_ihc`` and ``ihc_to_he`` (:class:`PyramidPix2PixGenerator`) and, when ``with_discriminators`` is
    true, ``disc_ihc`` (judges ``cat([he, ihc])`` pairs, real or made by ``he_to_ihc``) and ``disc_he`` (judges
    ``cat([ihc, he])`` pairs). The discriminators live here, optional, so that the stage-1 trainer has one module to
    checkpoint, while the stage-2 classifier builds the GAN without them (no dead 5.5 M parameters and a generator-only
    state dict). Use :meth:`generator_parameters` and :meth:`discriminator_parameters` for the two optimizers, and
    :meth:`generator_state_dict` / :meth:`load_generators` to move trained translators to stage 2.

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
        with_discriminators: also build ``disc_ihc`` and ``disc_he`` (needed for training only).
        ndf: discriminator width.
        n_layers_d: discriminator depth (3 = 70x70 PatchGAN).
        norm_d: discriminator normalisation.
    """

    def __init__(
        self,
        channels: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: str = "batch",
        use_dropout: bool = True,
        dropout_p: float = 0.5,
        with_discriminators: bool = False,
        ndf: int = 64,
        n_layers_d: int = 3,
        norm_d: str = "batch",
    ) -> None:
        super().__init__()
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
        self.with_discriminators = with_discriminators
        if with_discriminators:
            disc_kwargs = {"in_channels": 2 * channels, "ndf": ndf, "n_layers": n_layers_d, "norm": norm_d}
            self.disc_ihc = PatchGANDiscriminator(**disc_kwargs)
            self.disc_he = PatchGANDiscriminator(**disc_kwargs)
        self._frozen = False

    # ----------------------------------------------------------------------------------------------- parameters
    def generator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of both generators (for the G optimizer)."""
        for name in _GENERATORS:
            yield from getattr(self, name).parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of both discriminators (for the D optimizer).

        Raises:
            RuntimeError: if the module was built with ``with_discriminators=False``.
        """
        if not self.with_discriminators:
            raise RuntimeError("this CrossModalGAN has no discriminators; build it with with_discriminators=True")
        for name in _DISCRIMINATORS:
            yield from getattr(self, name).parameters()

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
    def _check_stain(self, name: str, x: torch.Tensor, batch: int) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] != batch or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must be a tensor (B={batch}, {self.channels}, H, W) matching the mask, got {shape}"
            )

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
            mask: availability ``(B, 2)``, 0/1 (float or bool); column 0 = H&E, column 1 = IHC.

        Returns:
            ``(he_filled, ihc_filled)``, each ``(B, C, H, W)`` with the dtype of the given stain (or of the other one
            if ``None`` was passed).

        Raises:
            ValueError: for a mask that is not ``(B, 2)`` of 0/1 values, a sample with neither stain, a stain passed as
                ``None`` while the mask marks it available, or images whose shape does not match.
        """
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a (B, 2) tensor (column 0 = H&E, 1 = IHC available), got {shape}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask values must be 0 or 1")
        batch = mask.shape[0]
        has_he, has_ihc = mask[:, 0].bool(), mask[:, 1].bool()
        neither = (~has_he & ~has_ihc).nonzero().flatten().tolist()
        if neither:
            raise ValueError(f"samples {neither} have neither H&E nor IHC; at least one stain is needed")
        if he is None and bool(has_he.any()):
            raise ValueError("he is None but the mask marks H&E available for some samples")
        if ihc is None and bool(has_ihc.any()):
            raise ValueError("ihc is None but the mask marks IHC available for some samples")
        if he is not None:
            self._check_stain("he", he, batch)
        if ihc is not None:
            self._check_stain("ihc", ihc, batch)
        if he is not None and ihc is not None and he.shape != ihc.shape:
            raise ValueError(f"he and ihc must have the same shape, got {tuple(he.shape)} and {tuple(ihc.shape)}")

        he_out = he if he is not None else torch.zeros_like(ihc)  # type: ignore[arg-type]
        ihc_out = ihc if ihc is not None else torch.zeros_like(he)  # type: ignore[arg-type]
        need_he = (~has_he).nonzero().flatten().to(he_out.device)
        need_ihc = (~has_ihc).nonzero().flatten().to(ihc_out.device)
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

    def forward(
        self, he: torch.Tensor | None, ihc: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`synthesize`."""
        return self.synthesize(he, ihc, mask)

    # ------------------------------------------------------------------------------------------------- weights
    def generator_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the two generators only (keys ``he_to_ihc.*``, ``ihc_to_he.*``), detached tensors."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in _GENERATORS}

    def load_generators(
        self, source: str | os.PathLike | Mapping[str, torch.Tensor], key: str | None = None
    ) -> CrossModalGAN:
        """Load both generators from a file or a state dict.

        The state dict must hold every ``he_to_ihc.*`` and ``ihc_to_he.*`` entry of this module (parameters and
        BatchNorm buffers). ``disc_he.*``/``disc_ihc.*`` entries of a full stage-1 checkpoint are skipped; any other key
        is an error. Files are read with ``torch.load(..., weights_only=True)``, on the CPU.

        Args:
            source: path of a ``.pt`` file holding a state dict, or the state dict itself.
            key: if given, the state dict is ``loaded[key]`` (e.g. a checkpoint dict ``{"cmgan": ..., "optimizer":
                ...}``).

        Returns:
            ``self``.

        Raises:
            FileNotFoundError: if ``source`` is a path that does not exist.
            KeyError: for missing or unexpected keys, or a ``key`` not in the loaded dict.
            ValueError: if the loaded object is not a dict of tensors or a tensor shape does not match.
        """
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"CM-GAN generator weights not found: {os.fspath(source)}")
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        else:
            loaded = source
        if key is not None:
            if not isinstance(loaded, Mapping) or key not in loaded:
                found = list(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
                raise KeyError(f"key '{key}' not in the loaded checkpoint (found {found})")
            loaded = loaded[key]
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError("expected a state dict (a mapping of names to tensors) for the CM-GAN generators")

        state = {k: v for k, v in loaded.items() if k.split(".", 1)[0] in _GENERATORS}
        unexpected = sorted(k for k in loaded if k.split(".", 1)[0] not in _GENERATORS + _DISCRIMINATORS)
        expected = self.generator_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected += sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(
                "CM-GAN generator state dict does not match this architecture: "
                f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]}); "
                "check ngf, n_blocks and norm"
            )
        bad = [
            f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
            for k, v in state.items()
            if v.shape != expected[k].shape
        ]
        if bad:
            raise ValueError(f"CM-GAN generator weight shapes do not match (loaded vs model): {bad[:5]}")
        for name in _GENERATORS:
            prefix = f"{name}."
            getattr(self, name).load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        return self
