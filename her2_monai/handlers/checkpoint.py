"""Checkpoints: ignite's ``Checkpoint`` writing one file atomically; resumption through MONAI's ``CheckpointLoader``.

ignite's :class:`~ignite.handlers.Checkpoint` gathers the objects' state dicts (unwrapping DDP), keeps the best
score and has a state of its own; what it lacks for this bundle is a save handler that writes a *fixed* file name
atomically. ignite's ``DiskSaver(atomic=True)`` deletes the previous file before writing the next one under the same
name (a kill in between loses the best model) and leaves anonymous ``tmp*`` files when killed, and MONAI's
``CheckpointSaver`` writes in place. :class:`AtomicFileSaver` is that save handler (it also writes the file's SHA-256
beside it); :class:`CheckpointHandler` attaches the pair to an engine as MONAI handlers are attached. The loaders
(:class:`VerifiedCheckpointLoader`, :class:`ResumeCheckpointLoader`) check that checksum before reading a file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader

from her2_monai.fileio import atomic_torch_save, remove_stale_temporaries, verify_checksum

__all__ = ["AtomicFileSaver", "CheckpointHandler", "VerifiedCheckpointLoader", "ResumeCheckpointLoader"]

logger = logging.getLogger(__name__)

_EVENTS = {"epoch_completed": Events.EPOCH_COMPLETED, "completed": Events.COMPLETED}


class AtomicFileSaver(BaseSaveHandler):
    """ignite save handler that always writes ``path`` (whatever name ignite proposes), atomically, on rank 0 only.

    The previous file is replaced by a rename, never deleted first, so a kill at any moment leaves either the old or
    the new complete file; ``<path>.sha256`` is written right after it (see
    :func:`~her2_monai.fileio.atomic_torch_save`). A failed write (disk full) raises an ``OSError`` that names the
    file and says that the previous version is kept. Leftovers of a killed write are removed when the saver is created.

    Args:
        path: the destination file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        for leftover in remove_stale_temporaries(self.path):
            logger.warning("removed %s, left by an interrupted save of %s", leftover, self.path)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        # torch.distributed directly: ignite's idist.get_rank() sets up its own process group on first use, a
        # collective call that hangs when only rank 0 runs a stage.
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            try:
                atomic_torch_save(checkpoint, self.path, checksum=True)
            except OSError as err:
                kept = "the previous version is kept" if self.path.is_file() else "no earlier version exists"
                raise OSError(err.errno, f"could not write {self.path} ({err}); {kept}") from err

    def remove(self, filename: str) -> None:
        """Nothing to remove: the next save replaces the file in place."""


class CheckpointHandler:
    """Save ``save_dict`` to one file with ignite's :class:`~ignite.handlers.Checkpoint` at an engine event.

    Three uses in the bundle: the resume checkpoint of a stage (every epoch, ``include_engine=True``), the best model
    (on the validator, ``score_name`` set: written only when the score improves) and a stage's final weights
    (``event="completed"``). A ``save_dict`` with a single object is written as that object's plain state dict
    (ignite's convention), so ``models/*.pt`` load with ``load_state_dict(torch.load(..., weights_only=True))``.

    The handler is itself checkpointable (``state_dict`` holds the best score so far), so a resumed run does not
    overwrite its best model with a worse one.

    Args:
        save_path: the file to write.
        save_dict: objects with ``state_dict()``.
        event: ``"epoch_completed"`` or ``"completed"``.
        score_name: save only when ``engine.state.metrics[score_name]`` beats the best so far (higher is better).
        include_engine: also save the engine it is attached to, under ``engine_key`` (to resume training).
        engine_key: that key.
        save_interval: with ``"epoch_completed"``, save every this many epochs.

    Raises:
        ValueError: for an unknown event, a bad interval or a ``save_dict`` using ``engine_key``.
    """

    def __init__(
        self,
        save_path: str | os.PathLike,
        save_dict: Mapping[str, Any],
        event: str = "epoch_completed",
        score_name: str | None = None,
        include_engine: bool = False,
        engine_key: str = "trainer",
        save_interval: int = 1,
    ) -> None:
        if event not in _EVENTS:
            raise ValueError(f"event must be one of {sorted(_EVENTS)}, got '{event}'")
        if save_interval < 1:
            raise ValueError(f"save_interval must be at least 1, got {save_interval}")
        if include_engine and engine_key in save_dict:
            raise ValueError(f"'{engine_key}' is reserved for the engine's own state; rename that save_dict entry")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.event = event
        self.score_name = score_name
        self.include_engine = include_engine
        self.engine_key = engine_key
        self.save_interval = save_interval
        self.checkpoint = self._make(self.save_dict)

    def _make(self, to_save: Mapping[str, Any]) -> Checkpoint:
        score: Callable[[Engine], float] | None = None
        if self.score_name is not None:
            name = self.score_name

            def score(engine: Engine) -> float:
                if name not in engine.state.metrics:
                    raise KeyError(f"metric '{name}' not computed; available: {sorted(engine.state.metrics)}")
                return float(engine.state.metrics[name])

        return Checkpoint(dict(to_save), AtomicFileSaver(self.save_path), n_saved=1, score_function=score)

    def attach(self, engine: Engine) -> None:
        """Register on the configured event (with the engine added to what is saved when ``include_engine``)."""
        if self.include_engine:
            saved = self.checkpoint.state_dict()
            self.checkpoint = self._make({self.engine_key: engine, **self.save_dict})
            self.checkpoint.load_state_dict(saved)
        event = _EVENTS[self.event]
        if self.event == "epoch_completed" and self.save_interval > 1:
            event = event(every=self.save_interval)
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        before = self.checkpoint.last_checkpoint
        self.checkpoint(engine)
        if self.score_name is None or self.checkpoint.last_checkpoint != before or engine.state.epoch == 1:
            logger.info("epoch %d: wrote %s", engine.state.epoch, self.save_path)

    def state_dict(self) -> dict[str, Any]:
        """ignite's record of what was saved with which score."""
        return self.checkpoint.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore that record (called when a run resumes)."""
        self.checkpoint.load_state_dict(state)


class VerifiedCheckpointLoader(CheckpointLoader):
    """MONAI's :class:`~monai.handlers.CheckpointLoader` that checks the file's SHA-256 (``<file>.sha256``) first.

    A file that differs from its checksum is refused (:class:`~her2_monai.fileio.ChecksumMismatchError`); a file
    without one (an older version's) is loaded with a warning. Arguments are those of MONAI's loader.
    """

    def __call__(self, engine: Engine) -> None:
        verify_checksum(self.load_path)
        super().__call__(engine)


class ResumeCheckpointLoader(VerifiedCheckpointLoader):
    """:class:`VerifiedCheckpointLoader` that also restores the engine it is attached to.

    A config cannot list the trainer inside its own handlers' ``load_dict`` without a reference cycle, so the engine
    is added here when the loader is attached. Without a checkpoint file the stage starts from scratch (a stage of
    ``training`` that had not saved anything yet when the run was killed), which is logged.

    Args:
        load_path: the resume checkpoint written by :class:`CheckpointHandler` with ``include_engine=True``.
        load_dict: the objects saved in it (without the engine).
        engine_key: key of the engine's state in the file.
        map_location: device mapping for the loaded tensors.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: Mapping[str, Any],
        engine_key: str = "trainer",
        map_location: str | dict | None = "cpu",
    ) -> None:
        super().__init__(load_path=str(load_path), load_dict=dict(load_dict), map_location=map_location)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if not Path(self.load_path).is_file():
            logger.warning("resume requested but %s does not exist: starting from scratch", self.load_path)
            return
        self.load_dict[self.engine_key] = engine
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except ValueError as err:
            # torch's message for an optimizer built over other parameters names neither the file nor the cause.
            if "parameter group" not in str(err):
                raise
            raise ValueError(
                f"cannot resume from {self.load_path}: the optimizer saved in it trained a different set of parameters "
                f"than this run's ({err}). Resume with the settings the run started with (the network, and which "
                "layers train: e.g. --hybrid_unfreezing true for a run started before 'auto' was the default), or "
                "start afresh without --resume."
            ) from err
        logger.info("resumed from %s at epoch %d", self.load_path, engine.state.epoch)
