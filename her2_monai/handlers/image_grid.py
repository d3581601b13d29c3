"""Real-versus-synthetic image grids of the CM-GAN, saved every validation run.

The grids are files; the stage's MONAI ``MLFlowHandler`` logs the folder as run artifacts (its ``artifacts``
argument), so no MLflow code is needed here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from einops import rearrange
from ignite.engine import Engine, Events

from her2_monai.fileio import save_image_atomic
from her2_monai.metrics.translation import to_uint8_images

__all__ = ["TranslationGridSaver"]

_COLUMNS = ("he", "fake_he", "ihc", "fake_ihc")


class TranslationGridSaver:
    """Save a PNG grid per validation run: columns H&E | synthetic H&E | IHC | synthetic IHC, one row per sample.

    Attach to a :class:`~her2_monai.engines.evaluators.TranslationEvaluator` run by MONAI's ``ValidationHandler`` (its
    ``state.epoch`` is then the trainer's epoch, used in the file name); the first batch of each run is used.

    Args:
        output_dir: folder of the PNG files (``grid_epoch_NNN.png``).
        max_rows: samples per grid.
    """

    def __init__(self, output_dir: str | os.PathLike, max_rows: int = 4) -> None:
        self.output_dir = Path(output_dir)
        self.max_rows = max_rows
        self._images: dict[str, np.ndarray] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._images = None

    def _keep_first(self, engine: Engine) -> None:
        if self._images is None and len(engine.state.output["he"]):
            self._images = {k: to_uint8_images(engine.state.output[k][: self.max_rows]) for k in _COLUMNS}

    def __call__(self, engine: Engine) -> Path | None:
        if self._images is None:
            return None
        grid = rearrange(np.stack([self._images[k] for k in _COLUMNS]), "col row h w c -> (row h) (col w) c")
        path = self.output_dir / f"grid_epoch_{int(engine.state.epoch):03d}.png"
        return save_image_atomic(np.ascontiguousarray(grid), path)
