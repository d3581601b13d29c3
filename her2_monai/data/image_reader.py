"""Reading histology patches whatever their container: format detected from content, always RGB uint8."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "read_rgb", "probe_image"]

# Patch files are at most a few thousand pixels a side; a larger file is a WSI or a decompression bomb.
_MAX_PIXELS = 20000 * 20000


class ImageReadError(ValueError):
    """An image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit and alpha images become 8-bit RGB (alpha composited on white, like a slide)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if data.max() > 255 else 255.0
        return Image.fromarray((data / peak * 255).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        image = Image.open(path)  # PIL identifies the format from the bytes, not from the extension
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unknown or corrupt format)") from None
    except OSError as err:
        raise ImageReadError(path, f"cannot open: {err}") from None
    width, height = image.size
    if width * height > _MAX_PIXELS:
        raise ImageReadError(path, f"image is {width}x{height}; patch readers accept at most {_MAX_PIXELS} pixels")
    return image


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """Check that a file is a complete, decodable image without paying for a full-resolution decode.

    JPEGs are decoded at reduced scale (``draft``), which still reads every entropy-coded block, so truncated or
    corrupt files are caught at a fraction of the cost.

    Args:
        path: image file.

    Returns:
        ``(width, height)`` at full resolution.

    Raises:
        ImageReadError: if the file is missing, not an image, truncated or corrupt.
    """
    path = Path(path)
    image = _open(path)
    size = image.size
    try:
        with image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"corrupt or truncated {image.format or 'image'} data ({err})") from None
    return size


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8, whatever its extension says.

    Real BCI files are JPEG bytes under ``.png`` names; grayscale, palette, 16-bit and RGBA files are converted.

    Args:
        path: image file.

    Returns:
        ``(H, W, 3)`` uint8 array.

    Raises:
        ImageReadError: if the file is missing, not an image, truncated or corrupt.
    """
    path = Path(path)
    image = _open(path)
    try:
        with image:
            image.load()
            return np.asarray(_to_rgb(image), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"corrupt or truncated {image.format or 'image'} data ({err})") from None
