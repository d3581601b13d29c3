"""Open a whole-slide image and read regions of it without ever holding a full-resolution array.

:func:`open_slide` picks a backend from the file's content:

* ``tifffile`` -- tiled (or stripped) TIFF, Aperio SVS, generic pyramidal TIFF. The slide is opened with MONAI's
  :class:`monai.data.WSIReader` (tifffile backend), which gives the levels, their sizes and downsamples and the
  resolution. Regions (and the thumbnail, from the smallest adequate level, in strips) are decoded here, one TIFF
  tile (or strip) at a time: MONAI's tifffile backend decodes the *whole level* for every patch it returns
  (``TiffFileWSIReader._get_patch`` calls ``asarray(level=...)``), which on a 100k x 100k slide is tens of GB.
* ``openslide`` -- when the ``openslide`` package is installed (``pip install "her2-monai[wsi]"`` installs
  ``openslide-python`` and the library itself, ``openslide-bin``) or asked for, through MONAI's OpenSlide backend,
  whose ``get_data`` reads regions natively (every format OpenSlide reads: MRXS, NDPI, SCN, VMS, BIF, DICOM, ...).
* ``pil`` -- a plain PNG, JPEG or untiled image. These formats cannot be read region by region, so the image is
  decoded once, whole (``max_pixels`` bounds it); tiles are still streamed to the model.

Coordinates are ``(x, y)`` = (column, row) in level-0 pixels, as in OpenSlide and QuPath.
"""

from __future__ import annotations

import math
import os
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "Slide",
    "SlideOpenError",
    "TiffSlide",
    "OpenSlideSlide",
    "PlainImageSlide",
    "open_slide",
    "BACKENDS",
    "INSTALL_HINT",
]

BACKENDS = ("auto", "tifffile", "openslide", "pil")
#: Largest plain (non-tiled) image decoded whole: 1e9 pixels = 3 GB of RGB.
DEFAULT_MAX_PLAIN_PIXELS = 1_000_000_000
_ASPECT_TOLERANCE = 0.02  # a TIFF page is a pyramid level if its aspect ratio is within 2% of the full image's
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.]+)")
#: What to install for the formats only OpenSlide reads (named in the error of a file no installed reader opens).
INSTALL_HINT = (
    "for MRXS, NDPI, SCN, VMS/VMU, BIF, DICOM-WSI and the other OpenSlide formats install the OpenSlide extra: "
    'pip install "her2-monai[wsi]" (openslide-python and openslide-bin)'
)


class SlideOpenError(ValueError):
    """A slide cannot be opened or read; the message names the file and the reason."""


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` of any integer type -> ``(H, W, 3)`` uint8."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    pixels = pixels[..., :3]
    if pixels.dtype != np.uint8:
        if np.issubdtype(pixels.dtype, np.integer) and pixels.dtype.itemsize == 2:
            pixels = (pixels >> 8).astype(np.uint8)
        else:
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels)


def _block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor`` x ``factor`` block of a ``(H, W, 3)`` uint8 image, rounded half to even, as uint8.

    Summed as ``factor**2`` strided slices in uint32 (each a plain vectorised add; a mean over axes (1, 3) of the
    reshaped array is a strided reduction, about 4x slower). The float32 quotient ``s / n`` is what the float32 mean
    of ``n`` uint8 values gives (their sum is exact), so the rounding is the same.
    """
    height, width = pixels.shape[0] // factor, pixels.shape[1] // factor
    sums = np.zeros((height, width, pixels.shape[2]), np.uint32)
    for row in range(factor):
        for col in range(factor):
            sums += pixels[row : height * factor : factor, col : width * factor : factor]
    means = sums.view(np.float32)  # in place: a thumbnail-sized float64 array costs more than the sums
    np.divide(sums, factor * factor, out=means, dtype=np.float32)
    return np.round(means, out=means).astype(np.uint8)


class Slide(ABC):
    """An opened slide: its pyramid levels and region reads.

    Attributes:
        path: the file.
        backend: ``tifffile``, ``openslide`` or ``pil``.
        level_dimensions: ``(width, height)`` of each pyramid level, level 0 first.
        level_downsamples: downsample of each level relative to level 0.
        mpp: microns per pixel at level 0, when the file says (``None`` otherwise).
    """

    backend = ""

    def __init__(self, path: Path, dimensions: list[tuple[int, int]], downsamples: list[float], mpp: float | None):
        self.path = path
        self.level_dimensions = dimensions
        self.level_downsamples = downsamples
        self.mpp = mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` at level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def check_level(self, level: int) -> int:
        """``level`` if the slide has it.

        Raises:
            SlideOpenError: naming the levels the slide has.
        """
        if not 0 <= int(level) < self.level_count:
            sizes = ", ".join(f"{i}: {w}x{h}" for i, (w, h) in enumerate(self.level_dimensions))
            raise SlideOpenError(f"slide '{self.path}' has no level {level}; its levels are {sizes}")
        return int(level)

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Read a region; parts outside the slide are white.

        Args:
            x: left edge in level-0 pixels.
            y: top edge in level-0 pixels.
            width: region width in pixels of ``level``.
            height: region height in pixels of ``level``.
            level: pyramid level.

        Returns:
            ``(height, width, 3)`` uint8 RGB.
        """
        level = self.check_level(level)
        if width < 1 or height < 1:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        scale = self.level_downsamples[level]
        lx, ly = int(math.floor(x / scale)), int(math.floor(y / scale))
        lw, lh = self.level_dimensions[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, lw), min(ly + height, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(x0, y0, x1 - x0, y1 - y0, level)
        return out

    @abstractmethod
    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        """Read a region inside ``level`` given in that level's pixels -> ``(height, width, 3)`` uint8."""

    def overview_level(self, max_side: int) -> int:
        """The smallest level whose longer side is still at least ``max_side`` (else the largest level)."""
        candidates = [i for i, (w, h) in enumerate(self.level_dimensions) if max(w, h) >= max_side]
        return candidates[-1] if candidates else 0

    def thumbnail(self, max_side: int = 2048, strip_pixels: int = 2**24) -> tuple[np.ndarray, float]:
        """A downsampled view of the whole slide, made from the smallest adequate level in strips.

        Memory is the thumbnail plus one strip of at most ``strip_pixels`` pixels of the source level.

        Args:
            max_side: longer side of the result in pixels (smaller if the slide is smaller).
            strip_pixels: pixels of the source level read at a time.

        Returns:
            ``(thumbnail (h, w, 3) uint8, downsample relative to level 0)``.
        """
        level = self.overview_level(max_side)
        lw, lh = self.level_dimensions[level]
        factor = max(1, int(math.ceil(max(lw, lh) / max_side)))  # integer block-mean reduction of the level
        tw, th = max(1, lw // factor), max(1, lh // factor)
        out = np.empty((th, tw, 3), np.uint8)
        rows = max(factor, (strip_pixels // max(lw, 1)) // factor * factor)
        scale = self.level_downsamples[level]
        for top in range(0, th * factor, rows):
            height = min(rows, th * factor - top)
            strip = self._read(0, top, tw * factor, height, level)
            out[top // factor : (top + height) // factor] = _block_mean(strip, factor)
        downsample = scale * lw / tw
        return out, float(downsample)

    @abstractmethod
    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TiffSlide(Slide):
    """A TIFF slide: levels from MONAI's ``WSIReader`` (tifffile backend), regions decoded tile by tile.

    Args:
        path: the file.

    Raises:
        SlideOpenError: if tifffile cannot read it, or its tiles need a codec that is not installed.
    """

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        from monai.data import WSIReader

        self._reader = WSIReader(backend="tifffile", level=0)
        try:
            self._tiff = self._reader.read(str(path))
            base = self._reader.get_size(self._tiff, 0)  # (height, width); a TIFF without pages fails here
        except Exception as err:  # noqa: BLE001 - tifffile raises many types for a non-TIFF file
            raise SlideOpenError(f"slide '{path}' is not a readable TIFF ({type(err).__name__}: {err})") from None
        pages, dimensions, downsamples = [], [], []
        for level in range(self._reader.get_level_count(self._tiff)):
            height, width = self._reader.get_size(self._tiff, level)
            aspect_error = abs(width / height - base[1] / base[0]) / (base[1] / base[0])
            downsample = base[1] / width
            if aspect_error > _ASPECT_TOLERANCE or (downsamples and downsample <= downsamples[-1]):
                continue  # Aperio label and macro images, or an out-of-order page
            pages.append(self._tiff.pages[level])
            dimensions.append((int(width), int(height)))
            downsamples.append(float(downsample))
        self._pages = pages
        self._lock = threading.Lock()
        super().__init__(Path(path), dimensions, downsamples, self._mpp())
        self._check_codec()

    def _mpp(self) -> float | None:
        try:
            mpp = self._reader.get_mpp(self._tiff, 0)
            return float(mpp[1])
        except (ValueError, KeyError, ZeroDivisionError, AttributeError):
            pass
        found = _APERIO_MPP.search(self._pages[0].description or "")
        return float(found.group(1)) if found else None

    def _check_codec(self) -> None:
        page = self._pages[0]
        try:
            self._segment(page, 0)
        except (ValueError, RuntimeError, NotImplementedError) as err:
            hint = " (pip install imagecodecs)" if "imagecodecs" in str(err) else ""
            raise SlideOpenError(f"slide '{self.path}': cannot decode its tiles: {err}{hint}") from None

    @staticmethod
    def _segment_shape(page) -> tuple[int, int]:
        if page.is_tiled:
            return int(page.tilelength), int(page.tilewidth)
        return int(min(page.rowsperstrip or page.imagelength, page.imagelength)), int(page.imagewidth)

    def _segment(self, page, index: int) -> np.ndarray:
        handle = self._tiff.filehandle
        with self._lock:
            handle.seek(page.dataoffsets[index])
            data = handle.read(page.databytecounts[index])
        segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        if segment is None:  # an empty (never written) tile
            return np.full((*shape[1:3], 3), 255, np.uint8)
        return _rgb(segment.reshape(segment.shape[-3:]))

    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        page = self._pages[level]
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            raise SlideOpenError(f"slide '{self.path}': planar-separated TIFF samples are not supported")
        seg_h, seg_w = self._segment_shape(page)
        across = int(math.ceil(page.imagewidth / seg_w))
        out = np.empty((height, width, 3), np.uint8)
        for row in range(y // seg_h, (y + height - 1) // seg_h + 1):
            for col in range(x // seg_w, (x + width - 1) // seg_w + 1):
                segment = self._segment(page, row * across + col)
                top, left = row * seg_h, col * seg_w
                y0, y1 = max(y, top), min(y + height, top + segment.shape[0])
                x0, x1 = max(x, left), min(x + width, left + segment.shape[1])
                out[y0 - y : y1 - y, x0 - x : x1 - x] = segment[y0 - top : y1 - top, x0 - left : x1 - left]
        return out

    def close(self) -> None:
        self._tiff.close()


class OpenSlideSlide(Slide):
    """A slide read through MONAI's ``WSIReader`` with the OpenSlide backend (regions read natively).

    Raises:
        SlideOpenError: if OpenSlide is not installed or cannot read the file.
    """

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        from monai.data import WSIReader

        if not _openslide_available():
            raise SlideOpenError(f"slide '{path}': OpenSlide is not installed; {INSTALL_HINT}")
        try:
            self._reader = WSIReader(backend="openslide", level=0)
            self._slide = self._reader.read(str(path))
        except Exception as err:  # noqa: BLE001 - missing package or unreadable file
            raise SlideOpenError(f"slide '{path}': OpenSlide cannot read it ({type(err).__name__}: {err})") from None
        dimensions, downsamples = [], []
        for level in range(self._reader.get_level_count(self._slide)):
            height, width = self._reader.get_size(self._slide, level)
            dimensions.append((int(width), int(height)))
            downsamples.append(float(self._reader.get_downsample_ratio(self._slide, level)))
        try:
            mpp: float | None = float(self._reader.get_mpp(self._slide, 0)[1])
        except (ValueError, KeyError):
            mpp = None
        super().__init__(Path(path), dimensions, downsamples, mpp)

    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        scale = self.level_downsamples[level]
        location = (int(round(y * scale)), int(round(x * scale)))  # MONAI: (row, column) at level 0
        patch, _ = self._reader.get_data(self._slide, location=location, size=(height, width), level=level)
        return _rgb(np.moveaxis(np.asarray(patch), 0, -1))

    def close(self) -> None:
        self._slide.close()


class PlainImageSlide(Slide):
    """A PNG, JPEG or other single image that PIL reads, decoded once, whole; one level.

    Args:
        path: the file.
        max_pixels: refuse larger images (they would take ``3 * pixels`` bytes).

    Raises:
        SlideOpenError: if PIL cannot read it or it exceeds ``max_pixels``.
    """

    backend = "pil"

    def __init__(self, path: Path, max_pixels: int = DEFAULT_MAX_PLAIN_PIXELS) -> None:
        try:
            with Image.open(path) as probe:
                width, height = probe.size
        except Exception as err:  # noqa: BLE001 - PIL raises many types
            raise SlideOpenError(f"slide '{path}' is not a readable image ({type(err).__name__}: {err})") from None
        if width * height > max_pixels:
            raise SlideOpenError(
                f"slide '{path}' is a plain {width}x{height} image: plain PNG/JPEG files are decoded whole, and this "
                f"one exceeds {max_pixels:,} pixels; convert it to a tiled pyramidal TIFF (e.g. "
                "`vips tiffsave in.png out.tif --tile --pyramid --compression jpeg`)"
            )
        limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # checked above against our own, explicit bound
            with Image.open(path) as image:
                self._pixels = np.asarray(image.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise SlideOpenError(f"slide '{path}': cannot decode it ({type(err).__name__}: {err})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        super().__init__(Path(path), [(width, height)], [1.0], None)

    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        return self._pixels[y : y + height, x : x + width].copy()

    def close(self) -> None:
        self._pixels = np.zeros((0, 0, 3), np.uint8)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as stream:
        head = stream.read(4)
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def open_slide(
    path: str | os.PathLike, backend: str = "auto", max_plain_pixels: int = DEFAULT_MAX_PLAIN_PIXELS
) -> Slide:
    """Open a slide with the backend that fits its content.

    ``auto``: tifffile for a TIFF (SVS, tiled or pyramidal TIFF), OpenSlide for a TIFF that tifffile cannot decode and
    for other slide formats (when OpenSlide is installed: ``pip install "her2-monai[wsi]"``), PIL for the rest (PNG,
    JPEG, ...). A file none of them reads fails with the reasons, and names the extra when OpenSlide is missing.

    Args:
        path: the slide file.
        backend: one of :data:`BACKENDS`.
        max_plain_pixels: largest plain image (decoded whole) accepted.

    Returns:
        The opened slide (use it as a context manager or call ``close()``).

    Raises:
        SlideOpenError: if the file is missing or no backend reads it (naming the file and the reason).
        ValueError: for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got '{backend}'")
    path = Path(path)
    if not path.is_file():
        raise SlideOpenError(f"slide '{path}' not found")
    if backend == "tifffile":
        return TiffSlide(path)
    if backend == "openslide":
        return OpenSlideSlide(path)
    if backend == "pil":
        return PlainImageSlide(path, max_plain_pixels)
    openslide = _openslide_available()
    if _is_tiff(path):
        try:
            return TiffSlide(path)
        except SlideOpenError as err:
            if not openslide:
                raise SlideOpenError(f"{err}; {INSTALL_HINT}") from None
    opened_by_openslide = None
    if openslide:
        try:
            return OpenSlideSlide(path)
        except SlideOpenError as err:
            opened_by_openslide = err
    try:
        return PlainImageSlide(path, max_plain_pixels)
    except SlideOpenError as err:
        if "is not a readable image" not in str(err):
            raise  # PIL knows the format (too large, truncated): its reason is the answer
        if opened_by_openslide is None:
            raise SlideOpenError(f"{err}; {INSTALL_HINT}") from None
        raise SlideOpenError(f"{err}; {opened_by_openslide}") from None


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True
