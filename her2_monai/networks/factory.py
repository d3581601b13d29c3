"""Builders used by the bundle configs to assemble networks from stage outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from her2_monai.networks.cmgan import CrossModalGAN

__all__ = ["frozen_cmgan"]


def frozen_cmgan(weights: str | os.PathLike, **gan_kwargs: Any) -> CrossModalGAN:
    """Build a :class:`CrossModalGAN` (generators only), load the stage-1 weights and freeze it for stage 2.

    Args:
        weights: generator state dict written at the end of stage 1 (``models/cmgan.pt`` in the bundle).
        gan_kwargs: architecture arguments; they must match stage 1 (``ngf``, ``n_blocks``, ``norm``...).

    Returns:
        The frozen CM-GAN.

    Raises:
        FileNotFoundError: if ``weights`` does not exist, with the command that creates it.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"stage-1 CM-GAN weights not found at '{path}'. Train stage 1 first: python -m monai.bundle run train_gan "
            "--config_file bundle/configs/train.json (or run 'training', which runs both stages), or set "
            "'missing_strategy' to 'feature_substitution', which needs no GAN."
        )
    gan_kwargs.pop("with_discriminators", None)
    return CrossModalGAN(**gan_kwargs).load_generators(path).freeze()
