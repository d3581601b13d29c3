"""Run bundle workflows in child processes that stop at a chosen point and are then killed with SIGKILL.

The children are forked from a ``multiprocessing`` fork server that imported torch, MONAI and her2_monai once, so a
child costs no interpreter start-up (about 10 s each on the 2-core CI machine). A :class:`KillPoint` makes the child
block at an exact place -- when an engine fires an event, when a file is about to be renamed into place by the
atomic writer, or when a checksum file is about to be written -- and create a marker file; the parent then sends
SIGKILL, so the files on disk are exactly those the run had written at that point.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRELOAD = [
    "torch",
    "monai.bundle",
    "ignite.engine",
    "her2_monai.engines",
    "her2_monai.handlers",
    "her2_monai.data.prepare",
]


@dataclass(frozen=True)
class KillPoint:
    """Where a child stops.

    Args:
        name: label for messages.
        kind: ``"event"`` (an ignite engine fires ``event`` -- before that event's handlers run), ``"replace"`` (the
            atomic writer is about to rename a complete temporary file onto ``file``), or ``"checksum"`` (``file`` is
            in place and its ``.sha256`` is about to be written).
        engine: engine class name (``"event"`` points).
        event: ignite event name, e.g. ``"EPOCH_COMPLETED"`` (``"event"`` points).
        epoch: the engine's epoch, or for an evaluator the epoch of the trainer that runs it (``None``: any).
        file: file name (``"replace"`` and ``"checksum"`` points).
        occurrence: stop at the n-th match (1 = first).
    """

    name: str
    kind: str
    engine: str = ""
    event: str = ""
    epoch: int | None = None
    file: str = ""
    occurrence: int = 1


def _block(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def _install(point: KillPoint, marker: str) -> None:
    """Patch the child so that it blocks at ``point`` (test-only patches; the package is not changed)."""
    import ignite.engine

    import her2_monai.fileio as fileio

    seen = {"n": 0}

    def hit() -> None:
        seen["n"] += 1
        if seen["n"] == point.occurrence:
            _block(marker)

    if point.kind == "event":
        fire = ignite.engine.Engine._fire_event
        trainers: list[Any] = []

        def patched(engine: Any, event_name: Any, *args: Any, **kwargs: Any) -> None:
            if "Trainer" in type(engine).__name__ and event_name == ignite.engine.Events.STARTED:
                trainers.append(engine)
            if type(engine).__name__ == point.engine and getattr(event_name, "name", "") == point.event:
                epoch = engine.state.epoch if "Trainer" in point.engine or not trainers else trainers[-1].state.epoch
                if point.epoch is None or epoch == point.epoch:
                    hit()
            return fire(engine, event_name, *args, **kwargs)

        ignite.engine.Engine._fire_event = patched
    elif point.kind == "replace":
        replace = os.replace

        def patched_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst).name == point.file:
                hit()
            return replace(src, dst, *args, **kwargs)

        os.replace = patched_replace
    elif point.kind == "checksum":
        write_checksum = fileio.write_checksum

        def patched_checksum(path: Any, digest: str | None = None) -> Path:
            if Path(path).name == point.file:
                hit()
            return write_checksum(path, digest)

        fileio.write_checksum = patched_checksum
    else:
        raise ValueError(f"unknown kill point kind '{point.kind}'")


def _child(
    run_id: str, config_files: list[str], overrides: dict, log: str, point: KillPoint | None, marker: str
) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    import torch
    from monai.bundle import run

    torch.set_num_threads(1)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if point is not None:
        _install(point, marker)
    run(run_id=run_id, config_file=config_files, **overrides)


class BundleRunner:
    """Starts bundle workflows in forked children; runs them to the end or kills them at a :class:`KillPoint`.

    Args:
        config_files: the bundle configs (merged in order).
        logs: folder for the children's output.
    """

    def __init__(self, config_files: list[str], logs: Path) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.config_files = config_files
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def _start(self, run_id: str, overrides: dict, point: KillPoint | None) -> tuple[Any, Path, Path]:
        self.count += 1
        log = self.logs / f"{self.count:02d}_{run_id}_{point.name if point else 'full'}.log"
        marker = self.logs / f"{self.count:02d}_{run_id}.stopped"  # runners may share the folder
        args = (run_id, self.config_files, overrides, str(log), point, str(marker))
        process = self.context.Process(target=_child, args=args, daemon=True)
        process.start()
        return process, log, marker

    def run(self, run_id: str, overrides: dict, timeout: float = 600) -> Path:
        """Run ``run_id`` to the end.

        Returns:
            The child's log.

        Raises:
            AssertionError: if it fails or times out.
        """
        process, log, _ = self._start(run_id, overrides, None)
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError(f"{run_id} did not finish in {timeout} s:\n{_tail(log)}")
        assert process.exitcode == 0, f"{run_id} failed ({process.exitcode}):\n{_tail(log)}"
        return log

    def kill_at(self, run_id: str, overrides: dict, point: KillPoint, timeout: float = 600) -> Path:
        """Run ``run_id`` until it blocks at ``point``, then SIGKILL it.

        Returns:
            The child's log.

        Raises:
            AssertionError: if the child ends or times out before reaching the point.
        """
        process, log, marker = self._start(run_id, overrides, point)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if not process.is_alive():
                raise AssertionError(f"{run_id} ended ({process.exitcode}) before {point}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"{run_id} did not reach {point} in {timeout} s:\n{_tail(log)}")
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.join(60)
        assert process.exitcode == -signal.SIGKILL, (point, process.exitcode)
        return log


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def cli_value(value: Any) -> Any:
    """Overrides as ``monai.bundle.run`` receives them from a command line (lists as JSON text)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value
