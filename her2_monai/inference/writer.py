"""Writing one JSON prediction file per case, atomically (a reader never sees a half-written file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

from her2_monai.fileio import write_json_atomic
from her2_monai.inference.predictor import prediction_result

__all__ = ["PredictionWriter"]

logger = logging.getLogger(__name__)


class PredictionWriter:
    """Ignite handler: after each iteration, write one ``<id>.json`` per case of the decollated engine output.

    Each file holds :func:`~her2_monai.inference.predictor.prediction_result` (score, probabilities, confidence,
    refer and its reasons, OOD score, scenario, detected stains, inputs...) and the engine network's ``provenance``
    (what the model was trained on, with its warnings; see :mod:`her2_monai.data.provenance`). Expects
    ``decollate=True`` and post-processing that turns ``pred`` into probabilities (the bundle's ``postprocessing``).

    Args:
        output_dir: folder of the prediction files (created).
        refer_threshold: confidence below which a case is flagged ``refer`` (``None``: the threshold recorded with
            the model for each scenario, see :func:`~her2_monai.inference.predictor.prediction_result`).
    """

    def __init__(self, output_dir: str | os.PathLike, refer_threshold: float | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.refer_threshold = None if refer_threshold is None else float(refer_threshold)
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        """Register on ``ITERATION_COMPLETED`` (and reset the file list when a run starts)."""
        engine.add_event_handler(Events.STARTED, lambda _: self.written.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def __call__(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list) or not isinstance(batch, list):
            raise TypeError("PredictionWriter needs decollated batches (construct the evaluator with decollate=True)")
        # Read per batch, not once: a handler may load other weights (another record) into the network.
        provenance = getattr(getattr(engine, "network", None), "provenance", None)
        for data, out in zip(batch, output):
            item = {k: v for k, v in data.items() if k not in out}
            item.update(out)
            result = prediction_result(item, self.refer_threshold, provenance=provenance)
            name = result.get("id") or f"case_{len(self.written):05d}"
            self.written.append(write_json_atomic(result, self.output_dir / f"{name}.json"))

    def _summary(self, engine: Engine) -> None:
        if not self.written:
            raise RuntimeError(f"no prediction was written to {self.output_dir}: the inference input was empty")
        logger.info("wrote %d prediction file(s) to %s", len(self.written), self.output_dir)
