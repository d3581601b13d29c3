"""Atomic file output: a reader (or a resumed run) never sees a half-written file.

Every file the project writes goes through :func:`atomic_write`: the content is written to a temporary file in the
destination folder, then renamed over the destination (``os.replace`` is atomic on one file system). If the writer
fails (disk full, exception), the temporary file is removed and the previous version of the destination survives.

Model files get a SHA-256 checksum file beside them (``model.pt`` -> ``model.pt.sha256``, in ``sha256sum`` format) from
:func:`atomic_torch_save` with ``checksum=True``; :func:`verify_checksum` checks a file against it before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "replace_folder",
    "json_safe",
    "write_json_atomic",
    "atomic_torch_save",
    "save_image_atomic",
    "remove_stale_temporaries",
    "CHECKSUM_SUFFIX",
    "ChecksumMismatchError",
    "sha256_file",
    "checksum_path",
    "write_checksum",
    "verify_checksum",
]

logger = logging.getLogger(__name__)

#: Temporary files are named ``.<destination name>.<random>.tmp`` so a killed write can be found and removed.
TEMP_PREFIX = "."


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Create ``path`` through a temporary file: ``write(tmp_path)`` fills it, then it is renamed into place.

    Args:
        path: destination; missing parent folders are created.
        write: writes the complete content to the path it is given.
        mode: permission bits of the final file (``mkstemp`` would leave 0600).

    Returns:
        The destination path.

    Raises:
        Whatever ``write`` raises; the destination is then unchanged and no temporary file remains.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike, stale_suffix: str = ".old") -> Path:
    """Put the complete folder ``staging`` in place of ``final``, which may exist (an earlier or half-written one).

    ``final`` is first renamed aside (a hidden sibling ending in ``stale_suffix``), then ``staging`` renamed into place,
    then the old folder removed: at every moment ``final`` is either the old complete folder, absent, or the new one.

    Args:
        staging: the new folder, complete, on the same file system as ``final``.
        final: where it goes.
        stale_suffix: name suffix of the folder the old one is moved into while it is removed (so that a crash there
            leaves something a caller can recognise and clean up).

    Returns:
        ``final``.
    """
    final = Path(final)
    if final.exists():
        stale = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}.", suffix=stale_suffix, dir=final.parent))
        os.replace(final, stale / final.name)
        os.replace(staging, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left beside ``path`` when a process was killed mid-write.

    ``SIGKILL`` or a power cut skips the cleanup, leaving a ``.<name>.<random>.tmp`` file (possibly hundreds of MB).
    Only one process writes a given path (rank 0 under DDP), so no live writer's file is removed.

    Returns:
        The removed files.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.glob(f"{TEMP_PREFIX}{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) by ``None``, recursively; numpy/torch scalars become numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(content: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``content`` as strict JSON (NaN and infinities become ``null``), atomically.

    Args:
        content: JSON-serialisable data.
        path: destination.
        indent: JSON indentation.

    Returns:
        The destination path.
    """
    text = json.dumps(json_safe(content), indent=indent, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | os.PathLike, checksum: bool = False) -> Path:
    """``torch.save`` through :func:`atomic_write`, optionally with a checksum file beside the result.

    With ``checksum``, the order is: write and hash the temporary file, delete the old checksum file, rename the new
    file into place, write the new checksum file atomically. A kill at any point leaves either a file with its matching
    checksum or a file without one (a warning when loaded), never a file with a wrong checksum.

    Args:
        obj: what to save.
        path: destination.
        checksum: also write ``<path>.sha256``.

    Returns:
        The destination path.
    """
    import torch

    def save(tmp: Path) -> None:
        # Through a file object: torch then names the archive's records "archive/..." instead of after the
        # (random) temporary file name, so the same content always gives the same bytes and the same checksum.
        try:
            with open(tmp, "wb") as stream:
                torch.save(obj, stream)
        except RuntimeError as err:
            # torch's archive writer, closed after a failed write (disk full), raises its own error over the OSError
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise

    if not checksum:
        return atomic_write(path, save)
    digest: list[str] = []

    def write(tmp: Path) -> None:
        save(tmp)
        digest.append(sha256_file(tmp))
        checksum_path(path).unlink(missing_ok=True)

    atomic_write(path, write)
    write_checksum(path, digest[0])
    return Path(path)


#: Suffix of the checksum file written beside a model file.
CHECKSUM_SUFFIX = ".sha256"
_UNVERIFIED_WARNED: set[str] = set()


class ChecksumMismatchError(ValueError):
    """A file's content differs from the SHA-256 recorded beside it when it was written."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as 64 hexadecimal digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of ``path`` is kept: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: str | os.PathLike, digest: str | None = None) -> Path:
    """Write ``<path>.sha256`` atomically, in ``sha256sum`` format (``sha256sum -c`` checks it).

    Args:
        path: the file the checksum describes.
        digest: its SHA-256 (computed from the file when ``None``).

    Returns:
        The checksum file.
    """
    digest = digest or sha256_file(path)
    line = f"{digest}  {Path(path).name}\n"
    return atomic_write(checksum_path(path), lambda tmp: tmp.write_text(line))


def verify_checksum(path: str | os.PathLike) -> bool:
    """Check a file against the checksum written beside it.

    A file without a checksum file (written by an older version, or by another tool) is accepted with one warning
    per file and process.

    Args:
        path: the file.

    Returns:
        ``True`` when the checksum matched, ``False`` when there was none.

    Raises:
        ChecksumMismatchError: if the file's SHA-256 differs from the recorded one, or the checksum file is unreadable.
    """
    path = Path(path)
    record = checksum_path(path)
    if not record.is_file():
        if str(path) not in _UNVERIFIED_WARNED:
            _UNVERIFIED_WARNED.add(str(path))
            logger.warning("%s has no %s file beside it: its integrity cannot be checked", path, CHECKSUM_SUFFIX)
        return False
    fields = record.read_text(errors="replace").split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ChecksumMismatchError(f"'{record}' is not a SHA-256 checksum file; delete it or restore it")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"'{path}' does not match its checksum ({record.name}: expected {expected[:16]}..., found "
            f"{actual[:16]}...): the file was changed or damaged after it was written; restore or retrain it"
        )
    return True


def save_image_atomic(pixels: Any, path: str | os.PathLike, format: str | None = None) -> Path:
    """Save an ``(H, W)`` or ``(H, W, 3)`` uint8 array (or a PIL image) as an image file, atomically.

    Args:
        pixels: the image.
        path: destination.
        format: PIL format name (default: from the extension, PNG when unknown; JPEG is written at quality 95).

    Returns:
        The destination path.
    """
    from PIL import Image

    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    format = format or Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    options = {"quality": 95} if format == "JPEG" else {}
    return atomic_write(path, lambda tmp: image.save(tmp, format=format, **options))
