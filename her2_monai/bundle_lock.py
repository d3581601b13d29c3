"""One training at a time per bundle folder.

Two trainings writing the same ``models/`` and ``eval/`` would overwrite each other's checkpoints and datalist. The
training workflows therefore take an exclusive lock on ``<bundle_root>/.training.lock`` when they start (the
``filelock`` package's operating-system lock: ``flock`` on POSIX, ``msvcrt`` on Windows, released when the process
ends, however it ends) and a second training on the same folder
stops at once with :class:`BundleLockedError`, naming the process that holds it. The holder's pid, host, start time
and command are kept beside the lock in ``.training.lock.owner`` (JSON); a lock left by a process that was killed
(``kill -9``, power cut) holds no ``flock`` any more and is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from her2_monai.fileio import write_json_atomic
from her2_monai.utils import as_bool

__all__ = ["LOCK_NAME", "BundleLockedError", "lock_bundle", "unlock_bundle"]

logger = logging.getLogger(__name__)

#: Name of the lock file in the bundle folder.
LOCK_NAME = ".training.lock"
_OWNER_SUFFIX = ".owner"

#: Locks this process holds: lock path -> the held lock (it lives as long as its open file).
_HELD: dict[str, FileLock] = {}


class BundleLockedError(RuntimeError):
    """Another process is training on the same bundle folder."""


def _owner_file(lock: Path) -> Path:
    return lock.with_name(lock.name + _OWNER_SUFFIX)


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {started}: {owner.get('command', '')[:200]}"


def _read_owner(lock: Path) -> dict:
    try:
        owner = json.loads(_owner_file(lock).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def lock_bundle(bundle_root: str | os.PathLike, enabled: bool | str = True) -> Path | None:
    """Take the training lock of a bundle folder for the rest of this process (or until :func:`unlock_bundle`).

    Taking it again in the same process is a no-op (in-process runs of several stages one after another).

    Args:
        bundle_root: the bundle folder (created if missing).
        enabled: ``False`` does nothing (evaluation, and DDP ranks other than 0).

    Returns:
        The lock file, or ``None`` when not enabled.

    Raises:
        BundleLockedError: if another live process holds the lock.
    """
    if not as_bool(enabled, "training_lock"):
        return None
    root = Path(bundle_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_NAME
    if str(lock) in _HELD:
        return lock
    # An operating-system lock only (no soft-lock fallback: a soft lock outlives a killed process), and the file
    # stays on release: its owner record sits beside it.
    held = FileLock(lock, mode=0o644, thread_local=False, fallback_to_soft=False, preserve_lock_file=True)
    try:
        held.acquire(timeout=0)
    except Timeout:
        raise BundleLockedError(
            f"another training is running on the bundle folder '{root}' ({_describe(_read_owner(lock))}); wait for "
            "it to finish, or train into another folder with --bundle_root DIR"
        ) from None
    previous = _read_owner(lock)
    if previous and previous.get("pid") != os.getpid():
        logger.warning(
            "taking over the training lock of '%s' left by %s, which ended without releasing it (killed?)",
            root,
            _describe(previous),
        )
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
    write_json_atomic(owner, _owner_file(lock))
    _HELD[str(lock)] = held
    return lock


def unlock_bundle(bundle_root: str | os.PathLike) -> None:
    """Release the training lock of a bundle folder if this process holds it (the lock file itself stays)."""
    lock = Path(bundle_root).expanduser().resolve() / LOCK_NAME
    held = _HELD.pop(str(lock), None)
    if held is None:
        return
    _owner_file(lock).unlink(missing_ok=True)
    held.release(force=True)
