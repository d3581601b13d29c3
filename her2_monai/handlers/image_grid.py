"""Real-versus-synthetic image grids of the CM-GAN, saved every validation run (and logged to MLflow)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from PIL import Image

from her2_monai.metrics.translation import to_uint8_images

__all__ = ["TranslationGridSaver"]

logger = logging.getLogger(__name__)


class TranslationGridSaver:
    """Save a PNG grid per validation run: columns H&E | synthetic H&E | IHC | synthetic IHC, one row per sample.

    Attach to a :class:`~her2_monai.engines.evaluators.TranslationEvaluator` run by MONAI's ``ValidationHandler`` (its
    ``state.epoch`` is then the trainer's epoch, used in the file name); the first batch of each run is used.

    Args:
        output_dir: folder of the PNG files (``grid_epoch_NNN.png``).
        mlflow_handler: a MONAI ``MLFlowHandler`` whose current run receives each grid as an artifact.
        max_rows: samples per grid.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        mlflow_handler: Any = None,
        max_rows: int = 4,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.max_rows = max_rows
        self._images: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._images = None

    def _keep_first(self, engine: Engine) -> None:
        if self._images is None and len(engine.state.output["he"]):
            self._images = {k: v[: self.max_rows] for k, v in engine.state.output.items()}

    def __call__(self, engine: Engine) -> Path | None:
        if self._images is None:
            return None
        columns = [to_uint8_images(self._images[k]) for k in ("he", "fake_he", "ihc", "fake_ihc")]
        rows = [np.concatenate([col[i] for col in columns], axis=1) for i in range(len(columns[0]))]
        epoch = int(engine.state.epoch)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"grid_epoch_{epoch:03d}.png"
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
        os.replace(tmp, path)
        handler = self.mlflow_handler
        if handler is not None and getattr(handler, "cur_run", None) is not None:
            handler.client.log_artifact(handler.cur_run.info.run_id, str(path), artifact_path="translation_grids")
        return path
