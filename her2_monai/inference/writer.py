"""Writing predictions and reports as JSON, atomically (a reader never sees a half-written file)."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from her2_monai.inference.predictor import prediction_result

__all__ = ["json_safe", "write_json_atomic", "PredictionWriter"]

logger = logging.getLogger(__name__)


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) by ``None``, recursively; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(content: Any, path: str | os.PathLike) -> Path:
    """Write ``content`` as strict JSON (NaN -> null) to a temporary file beside ``path``, then rename it.

    Args:
        content: JSON-serialisable data.
        path: destination; parent folders are created.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(json_safe(content), stream, indent=2, allow_nan=False)
            stream.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class PredictionWriter:
    """Ignite handler: after each iteration, write one ``<id>.json`` per case of the decollated engine output.

    Each file holds :func:`~her2_monai.inference.predictor.prediction_result` (score, probabilities, confidence,
    refer, scenario, detected stains, inputs...). Expects ``decollate=True`` and post-processing that turns ``pred``
    into probabilities (the bundle's ``postprocessing``).

    Args:
        output_dir: folder of the prediction files (created).
        refer_threshold: confidence below which a case is flagged ``refer``.
    """

    def __init__(self, output_dir: str | os.PathLike, refer_threshold: float = 0.5) -> None:
        self.output_dir = Path(output_dir)
        self.refer_threshold = float(refer_threshold)
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
        for data, out in zip(batch, output):
            item = {k: v for k, v in data.items() if k not in out}
            item.update(out)
            result = prediction_result(item, self.refer_threshold)
            name = result.get("id") or f"case_{len(self.written):05d}"
            self.written.append(write_json_atomic(result, self.output_dir / f"{name}.json"))

    def _summary(self, engine: Engine) -> None:
        logger.info("wrote %d prediction file(s) to %s", len(self.written), self.output_dir)
