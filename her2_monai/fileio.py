"""Atomic file output: a reader (or a resumed run) never sees a half-written file.

Every file the project writes goes through :func:`atomic_write`: the content is written to a temporary file in the
destination folder, then renamed over the destination (``os.replace`` is atomic on one file system). If the writer
fails (disk full, exception), the temporary file is removed and the previous version of the destination survives.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "json_safe",
    "write_json_atomic",
    "atomic_torch_save",
    "save_image_atomic",
    "remove_stale_temporaries",
]

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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`.

    Returns:
        The destination path.
    """
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
