"""Request errors and upload handling for the MONAI Label app: private temp folders, size and format checks.

Every problem with a request becomes a :class:`RequestError` (a FastAPI ``HTTPException``): a 4xx status and a
one-line message that names the upload by its client-side file name, never by a server path.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from her2_monai.data.image_reader import ImageReadError, probe_image

__all__ = [
    "RequestError",
    "ImageInfo",
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "client_name",
    "private_workdir",
    "save_upload",
    "check_image",
]

#: Container formats accepted for patches (detected from the bytes, never from the file name) -> file suffix.
ACCEPTED_FORMATS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp"}
#: Largest upload in bytes (a 2048x2048 PNG patch is about 12 MB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Largest image in pixels (8192 x 8192); whole slides go to the whole-slide task, not here.
DEFAULT_MAX_PIXELS = 8192 * 8192
_CHUNK = 1024 * 1024


class RequestError(HTTPException):
    """A client error: ``status_code`` (4xx, or 501 for a task that is not available) and a one-line ``detail``."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code=status_code, detail=message)

    @property
    def message(self) -> str:
        """The one-line message sent to the client."""
        return str(self.detail)


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`check_image` found: size in pixels and the container format."""

    width: int
    height: int
    format: str


def client_name(filename: str | None, default: str = "the uploaded file") -> str:
    """A safe label for an upload in messages: the base name the client sent, printable, at most 80 characters.

    Args:
        filename: the client's file name (may contain directories, which are dropped).
        default: label when no usable name was sent.

    Returns:
        The label, quoted, or ``default``.
    """
    if not filename:
        return default
    base = re.split(r"[\\/]", str(filename))[-1]
    base = "".join(c for c in base if c.isprintable())[:80]
    return f"'{base}'" if base else default


@contextlib.contextmanager
def private_workdir(parent: str | Path | None = None) -> Iterator[Path]:
    """A new folder readable only by the server's user (mode 0700), removed with its contents afterwards.

    Args:
        parent: where to create it (default: the system temp folder).

    Yields:
        The folder.
    """
    folder = Path(tempfile.mkdtemp(prefix="her2-label-", dir=None if parent is None else str(parent)))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_upload(stream: BinaryIO, folder: Path, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Copy an uploaded stream into ``folder`` with a server-chosen file name, enforcing a size limit.

    Args:
        stream: the upload (read in chunks).
        folder: a private folder (see :func:`private_workdir`).
        name: how to name the upload in error messages (see :func:`client_name`).
        max_bytes: largest accepted size.

    Returns:
        The saved file (``upload.bin``; the content decides its format, not the name).

    Raises:
        RequestError: 400 if the upload is empty, 413 if it is larger than ``max_bytes``.
    """
    dest = folder / "upload.bin"
    size = 0
    with open(dest, "wb") as out:
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"{name} is larger than {max_bytes // (1024 * 1024)} MB; send one patch")
            out.write(chunk)
    if size == 0:
        raise RequestError(400, f"{name} is empty (0 bytes); send a PNG, JPEG or TIFF patch")
    return dest


def check_image(path: Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that a file is a complete patch image of an accepted format and size, reading the header first.

    The pixel count is checked from the header before anything is decoded, so a "decompression bomb" (a small file
    whose header claims a huge image) is refused without allocating it.

    Args:
        path: the saved upload.
        name: how to name it in error messages.
        max_pixels: largest accepted ``width * height``.

    Returns:
        Its size and format.

    Raises:
        RequestError: 400 (empty, truncated or corrupt), 413 (too many pixels) or 415 (not an accepted image format).
    """
    accepted = ", ".join(sorted(ACCEPTED_FORMATS))
    if path.stat().st_size == 0:
        raise RequestError(400, f"{name} is empty (0 bytes); send a PNG, JPEG or TIFF patch")
    try:
        with Image.open(path) as image:  # reads the header only
            width, height, fmt = int(image.width), int(image.height), str(image.format or "")
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name} claims too many pixels (a decompression bomb?); refused") from None
    except UnidentifiedImageError:
        raise RequestError(415, f"{name} is not an image; accepted formats: {accepted}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(400, f"{name} could not be read as an image ({type(err).__name__})") from None
    if fmt not in ACCEPTED_FORMATS:
        raise RequestError(415, f"{name} is a {fmt or 'unknown'} image; accepted formats: {accepted}")
    if width < 1 or height < 1:
        raise RequestError(400, f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"{name} is {width}x{height} pixels; this server accepts patches of at most {max_pixels} pixels "
            "(whole slides are not supported yet)",
        )
    try:
        probe_image(path)  # decodes the data (JPEG at reduced scale), so truncated files are refused here
    except ImageReadError as err:
        raise RequestError(400, f"{name}: {err.reason}") from None
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name} is too large to decode") from None
    return ImageInfo(width, height, fmt)
