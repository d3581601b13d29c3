"""Atomic checkpoints and resumption (MONAI's ``CheckpointSaver`` writes in place, so a kill can corrupt a file)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from her2_monai.utils import as_bool

__all__ = [
    "atomic_torch_save",
    "remove_stale_temporaries",
    "AtomicCheckpointSaver",
    "BestModelSaver",
    "GeneratorExporter",
    "ResumeFromCheckpoint",
]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see a partial file.

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_torch_save` left beside ``path`` when a run was killed mid-write.

    ``SIGKILL`` (or a power cut) skips the cleanup of :func:`atomic_torch_save`, leaving a ``.<name>.<random>`` file,
    possibly hundreds of MB. The savers call this when attached, i.e. before they write again. Only one process may
    write a given path (rank 0 under DDP), so no other writer's file can be removed.

    Returns:
        The removed files.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
        logger.warning("removed %s, left by an interrupted save of %s", leftover, path)
    return removed


def _state_dicts(objects: Mapping[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in objects.items()}


class AtomicCheckpointSaver:
    """Save ``{name: obj.state_dict()}`` of training objects every ``save_interval`` epochs to one file, atomically.

    The engine it is attached to is saved too, under ``engine_key`` (epoch and iteration), so that
    :class:`ResumeFromCheckpoint` can continue a killed run; taking the engine at attach time keeps bundle configs free
    of a trainer <-> handler reference cycle.

    Args:
        save_path: checkpoint file (overwritten each time: it always holds the latest complete epoch).
        save_dict: objects with ``state_dict()`` (networks, optimizers, schedulers, other handlers...).
        save_interval: save every this many epochs.
        engine_key: key of the engine's own state in the file.
    """

    def __init__(
        self,
        save_path: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        engine_key: str = "trainer",
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be at least 1, got {save_interval}")
        if engine_key in save_dict:
            raise ValueError(f"'{engine_key}' is reserved for the engine's own state; rename that save_dict entry")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        """Save at the end of every ``save_interval``-th epoch (after removing leftovers of a killed save)."""
        remove_stale_temporaries(self.save_path)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)

    def __call__(self, engine: Engine) -> None:
        atomic_torch_save({self.engine_key: engine.state_dict(), **_state_dicts(self.save_dict)}, self.save_path)
        logger.info("checkpoint of epoch %d written to %s", engine.state.epoch, self.save_path)


class BestModelSaver:
    """Keep the network weights of the best validation epoch, as a plain state dict, written atomically.

    Attach to the validation evaluator (run by MONAI's ``ValidationHandler``, whose evaluator's ``state.epoch`` is the
    trainer's epoch). The best value is part of this handler's state, so put the handler in the trainer's
    :class:`AtomicCheckpointSaver` to keep the record across a resume.

    Args:
        save_path: file of the best weights (e.g. ``models/model.pt``).
        network: the network (a DDP wrapper is unwrapped).
        metric_name: key in ``engine.state.metrics`` to maximise.
    """

    def __init__(self, save_path: str | os.PathLike, network: torch.nn.Module, metric_name: str) -> None:
        self.save_path = Path(save_path)
        self.network = network
        self.metric_name = metric_name
        self.best = -math.inf
        self.best_epoch = 0

    def attach(self, engine: Engine) -> None:
        remove_stale_temporaries(self.save_path)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.metric_name not in engine.state.metrics:
            raise KeyError(f"metric '{self.metric_name}' not computed; available: {sorted(engine.state.metrics)}")
        value = float(engine.state.metrics[self.metric_name])
        if math.isnan(value) or value <= self.best:
            return
        self.best = value
        self.best_epoch = int(engine.state.epoch)
        model = getattr(self.network, "module", self.network)
        atomic_torch_save(model.state_dict(), self.save_path)
        logger.info("new best %s = %.4f at epoch %d -> %s", self.metric_name, value, self.best_epoch, self.save_path)

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])


class ResumeFromCheckpoint:
    """When ``enabled``, load an :class:`AtomicCheckpointSaver` file at the start of training and continue from it.

    The file is read with ``torch.load(..., weights_only=True)``. Without a file, training starts fresh (logged).

    Args:
        load_path: checkpoint file.
        load_dict: the same objects as the saver's ``save_dict`` (the engine itself is restored from ``engine_key``).
        enabled: resume (``False``: do nothing); the strings ``"true"``/``"false"`` of a command-line override work.
        map_location: device mapping for the loaded tensors.
        engine_key: key of the engine's state in the file.

    Raises:
        ValueError: if ``enabled`` is a string that is not a boolean; (when run) if the checkpoint lacks an object
            or its epoch exceeds the trainer's ``max_epochs``.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: Mapping[str, Any],
        enabled: bool | str = True,
        map_location: str | torch.device | None = "cpu",
        engine_key: str = "trainer",
    ) -> None:
        self.load_path = Path(load_path)
        self.load_dict = dict(load_dict)
        self.enabled = as_bool(enabled, "resume/enabled")
        self.map_location = map_location
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if not self.load_path.is_file():
            logger.warning("resume requested but %s does not exist: starting from scratch", self.load_path)
            return
        checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        to_load = {**self.load_dict, self.engine_key: engine}
        missing = sorted(set(to_load) - set(checkpoint))
        if missing:
            raise ValueError(f"checkpoint {self.load_path} lacks {missing}; it holds {sorted(checkpoint)}")
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"checkpoint {self.load_path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}"
            )
        if max_epochs is not None:
            engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at epoch %d", self.load_path, engine.state.epoch)


class GeneratorExporter:
    """When stage 1 completes, write the two CM-GAN generators as a plain state dict (what stage 2 loads), atomically.

    Args:
        save_path: output file (e.g. ``models/cmgan.pt``).
        network: the :class:`~her2_monai.networks.cmgan.CrossModalGAN` (a DDP wrapper is unwrapped).
    """

    def __init__(self, save_path: str | os.PathLike, network: torch.nn.Module) -> None:
        self.save_path = Path(save_path)
        self.network = network

    def attach(self, engine: Engine) -> None:
        remove_stale_temporaries(self.save_path)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        model = getattr(self.network, "module", self.network)
        atomic_torch_save(model.generator_state_dict(), self.save_path)
        logger.info("CM-GAN generators written to %s", self.save_path)
