"""Builders of the awkward image files real labs produce (and of hostile ones), for the reliability tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(pixels: np.ndarray, bit_depth: int = 8) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): ``(H, W, 3)`` uint8 or uint16 pixels, colour type 2."""
    height, width, _ = pixels.shape
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def bomb_png(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width x height`` RGB pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def tissue(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth pink-purple RGB uint8 patch (enough structure for every reader and the stain statistics)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([200 + 30 * np.sin(xx / 7.0), 120 + 40 * np.cos(yy / 5.0), 180 + 20 * np.sin((xx + yy) / 9.0)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """``image`` saved to bytes in ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG of ``pixels`` stored with an EXIF orientation tag (6 = viewers rotate it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def animated(pixels: list[np.ndarray], fmt: str = "GIF") -> bytes:
    """An animated GIF/PNG or a multi-page TIFF with one frame per array."""
    frames = [Image.fromarray(p) for p in pixels]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:])


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
