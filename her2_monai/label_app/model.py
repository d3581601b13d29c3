"""The served model: one predictor per app, loaded once, guarded by a lock, reloaded when training replaces it.

Also holds :func:`scrub_paths`, which keeps server paths out of every answer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from her2_monai.data.provenance import model_provenance

__all__ = ["ModelHolder", "scrub_paths"]

logger = logging.getLogger(__name__)

#: Weight files whose modification makes :class:`ModelHolder` reload the predictor.
WEIGHT_FILES = ("model.pt",)


class ModelHolder:
    """Owns the predictor: lazy (or eager) loading, a lock around every use, reload after retraining.

    PyTorch modules are not safe to call from several threads at once (``eval()``/``train()`` flags, BatchNorm
    buffers, the CPU thread pool), and MONAI Label serves requests from a thread pool, so :meth:`run` holds one lock
    for the whole call: concurrent requests queue instead of corrupting each other. The weight files' modification
    times are checked on each call; a training run that rewrites ``models/model.pt`` is picked up by the next request.

    Args:
        bundle_path: bundle folder with ``configs/inference.json`` and ``models/``.
        overrides: keyword overrides for :func:`her2_monai.inference.load_predictor`.
        loader: ``(bundle_path, **overrides) -> predictor`` (default ``load_predictor``; replaceable in tests).
    """

    def __init__(
        self,
        bundle_path: str | os.PathLike,
        overrides: dict[str, Any] | None = None,
        loader: Callable[..., Any] | None = None,
    ) -> None:
        self.bundle_path = Path(bundle_path)
        self.overrides = dict(overrides or {})
        self._loader = loader
        self._lock = threading.Lock()
        self._predictor: Any = None
        self._stamp: tuple[float, ...] | None = None
        self._provenance: tuple[tuple[float, ...], dict[str, Any]] | None = None

    def _weights_stamp(self) -> tuple[float, ...]:
        models = self.bundle_path / "models"
        return tuple((models / f).stat().st_mtime if (models / f).is_file() else -1.0 for f in WEIGHT_FILES)

    def _load(self) -> Any:
        if self._loader is None:
            from her2_monai.inference import load_predictor

            self._loader = load_predictor
        stamp = self._weights_stamp()
        predictor = self._loader(self.bundle_path, **self.overrides)
        self._predictor, self._stamp = predictor, stamp
        logger.info("HER2 predictor loaded from the bundle's models/ folder")
        return predictor

    def ensure_loaded(self) -> None:
        """Load the predictor now (start-up), so the first request does not pay for it.

        Raises:
            FileNotFoundError: if a weight file or config is missing (naming the command that makes it).
            ValueError: if the weights do not fit the configured network.
        """
        with self._lock:
            if self._predictor is None or self._stamp != self._weights_stamp():
                self._load()

    def provenance(self) -> dict[str, Any] | None:
        """What the served model was trained on (:func:`~her2_monai.data.provenance.model_provenance`), once per
        version of ``models/model.pt``.

        Taken from the loaded predictor when it is current, else read from the model file's record, without the
        predictor's lock: the app's info answers while a slide is being scored.

        Returns:
            The provenance (``source`` ``unknown`` for a file without the record or one that cannot be read), or
            ``None`` when the bundle has no model file yet.
        """
        stamp = self._weights_stamp()
        if stamp[0] < 0:
            return None
        if self._provenance is None or self._provenance[0] != stamp:
            predictor = self._predictor
            if predictor is not None and self._stamp == stamp and hasattr(predictor, "provenance"):
                value = dict(predictor.provenance)
            else:
                value = _file_provenance(self.bundle_path / "models" / WEIGHT_FILES[0])
            self._provenance = (stamp, value)
        return dict(self._provenance[1])

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """Call ``fn(predictor)`` under the lock, loading or reloading the predictor first when needed.

        Args:
            fn: the work to do with the predictor.

        Returns:
            What ``fn`` returns.
        """
        with self._lock:
            if self._predictor is None or self._stamp != self._weights_stamp():
                self._load()
            with torch.inference_mode():
                return fn(self._predictor)


def _file_provenance(model_file: Path) -> dict[str, Any]:
    from her2_monai.networks.factory import network_record, read_weights

    try:
        record = network_record(read_weights(model_file, "trained HER2 classifier")) or {}
    except (OSError, ValueError) as err:  # a damaged file: the predictor's load reports it; info still answers
        logger.warning("cannot read the training-data record of %s: %s", model_file.name, err)
        record = {}
    return model_provenance(record.get("metadata"))


def scrub_paths(value: Any, paths: Iterable[str | os.PathLike], placeholder: str = "<server>") -> Any:
    """Replace every occurrence of the given server paths in the strings of a JSON-like value.

    Args:
        value: dicts, lists and scalars.
        paths: server folders and files to hide (longest first is not required; it is sorted here).
        placeholder: what they become.

    Returns:
        A copy with the paths replaced.
    """
    needles = sorted({str(p) for p in paths if str(p) not in ("", "/", ".")}, key=len, reverse=True)

    def scrub(v: Any) -> Any:
        if isinstance(v, str):
            for needle in needles:
                v = v.replace(needle, placeholder)
            return v
        if isinstance(v, dict):
            return {scrub(k): scrub(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [scrub(x) for x in v]
        return v

    return scrub(value)
