"""Reading histology patches whatever their container: format detected from content, always RGB uint8.

Every failure is an :class:`ImageReadError` naming the file and the reason: a missing, empty, truncated or corrupt
file, a format PIL cannot read, or an image larger than :data:`MAX_PIXELS`. The size limit is applied to the header,
before any pixel is decoded, so a "decompression bomb" (a small file claiming a huge image) costs nothing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "MAX_PIXELS", "read_rgb", "probe_image"]

#: Largest ``width * height`` the patch readers accept (8192 x 8192, about 200 MB decoded). Patch files are at most a
#: few thousand pixels a side; a larger file is a whole slide (read those with MONAI's WSI readers) or a bomb. It is
#: below PIL's own decompression-bomb warning threshold, so every accepted file opens without a PIL warning.
MAX_PIXELS = 8192 * 8192

#: EXIF orientations that swap width and height (transposed, rotated by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """An image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _integer_to_uint8(data: np.ndarray) -> np.ndarray:
    """16- or 32-bit grey levels to 8 bits: full 16-bit range when values exceed 255, else taken as 8-bit."""
    data = data.astype(np.int64)
    peak = 65535 if data.max(initial=0) > 255 else 255
    return (np.clip(data, 0, peak) * 255 // peak).astype(np.uint8)


def _float_to_uint8(data: np.ndarray) -> np.ndarray:
    """Floating-point grey levels to 8 bits: ``[0, 1]`` when every finite value is at most 1, else ``[0, 255]``."""
    data = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scale = 255.0 if data.max(initial=0.0) <= 1.0 else 1.0
    return np.clip(np.round(data * scale), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, 16/32-bit, float, CMYK and alpha images become 8-bit RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I"):
        return Image.fromarray(_integer_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def _display_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` (the stored ``(width, height)``) as the loaded image is displayed, i.e. after its EXIF orientation."""
    width, height = size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about a damaged EXIF block, which does not harm the pixels
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` (header only) and check its size before anything is decoded."""
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    limit = f"patch readers accept at most {max_pixels} pixels; read whole slides with a WSI reader"
    try:
        with warnings.catch_warnings():
            # This reader's own limit (below) decides; PIL's warning would only duplicate it on stderr.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # PIL identifies the format from the bytes, not from the extension
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"the header claims too many pixels ({err}); {limit}") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unknown, unsupported or corrupt format)") from None
    except Exception as err:  # PIL's header parsers raise many types (struct.error, SyntaxError, ...) on bad bytes
        raise ImageReadError(path, f"cannot open: {type(err).__name__}: {err}") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageReadError(path, f"the header claims an image of {width}x{height} pixels")
    if width * height > max_pixels:
        image.close()
        raise ImageReadError(path, f"the header claims {width}x{height} pixels; {limit}")
    return image


def _decode_error(path: Path, image: Image.Image, err: Exception) -> ImageReadError:
    if isinstance(err, MemoryError):
        return ImageReadError(path, f"not enough memory to decode the {image.format or 'image'} data")
    return ImageReadError(path, f"corrupt or truncated {image.format or 'image'} data ({type(err).__name__}: {err})")


def probe_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Check that a file is a complete, decodable image without paying for a full-resolution decode.

    JPEGs are decoded at reduced scale (``draft``), which still reads every entropy-coded block, so truncated or
    corrupt files are caught at a fraction of the cost.

    Args:
        path: image file.
        max_pixels: largest accepted ``width * height``, checked on the header before decoding.

    Returns:
        ``(width, height)`` at full resolution, as :func:`read_rgb` returns it (after the EXIF orientation).

    Raises:
        ImageReadError: if the file is missing, empty, not an image, too large, truncated or corrupt.
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        with image:
            stored = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(1, stored[0] // 8), max(1, stored[1] // 8)))
            image.load()
            size = _display_size(image, stored)  # after load: PIL may read EXIF from the end of the file
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ... on damaged data
        raise _decode_error(path, image, err) from None
    return size


def read_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as RGB uint8, whatever its extension says.

    Real BCI files are JPEG bytes under ``.png`` names. Grayscale, palette, 16-bit, 32-bit, float, CMYK and RGBA
    files are converted (alpha composited on white, like empty glass); an EXIF orientation is applied (the image as
    viewers show it); of an animated or multi-page file the first frame is read.

    Args:
        path: image file.
        max_pixels: largest accepted ``width * height``, checked on the header before decoding.

    Returns:
        ``(H, W, 3)`` uint8 array.

    Raises:
        ImageReadError: if the file is missing, empty, not an image, too large, truncated or corrupt.
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        with image:
            image.load()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged EXIF block: PIL warns and leaves the image as stored
                upright = ImageOps.exif_transpose(image)
            return np.asarray(_to_rgb(upright), dtype=np.uint8).copy()
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ... on damaged data
        raise _decode_error(path, image, err) from None
