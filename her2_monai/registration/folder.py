"""Registering one H&E/IHC pair from files, and a whole BCI-layout folder of pairs, with atomic outputs."""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from her2_monai.data.image_reader import read_rgb
from her2_monai.fileio import atomic_write, save_image_atomic, write_json_atomic
from her2_monai.registration.pairwise import PairRegistration, RegistrationResult, RegistrationWarning, warp_rgb

__all__ = ["register_files", "register_folder", "checkerboard", "write_image", "write_json"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB uint8 image atomically, in the format its extension names (PNG for unknown extensions)."""
    return save_image_atomic(image, path)


def write_json(path: str | os.PathLike, document: Any) -> Path:
    """Write a JSON document atomically."""
    return write_json_atomic(document, path, indent=1)


def checkerboard(first: np.ndarray, second: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two same-size images, so misaligned edges show as breaks at tile borders.

    Args:
        first: ``(H, W, 3)`` image.
        second: ``(H, W, 3)`` image.
        tiles: tiles along the longer side.

    Returns:
        ``(H, W, 3)`` image.
    """
    height, width = first.shape[:2]
    size = max(1, max(height, width) // tiles)
    ys, xs = np.mgrid[0:height, 0:width]
    mask = ((ys // size + xs // size) % 2).astype(bool)
    return np.where(mask[..., None], second, first)


def _thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    scale = min(1.0, side / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def register_files(
    he: str | os.PathLike,
    ihc: str | os.PathLike,
    registration: PairRegistration | None = None,
) -> tuple[np.ndarray, np.ndarray, RegistrationResult]:
    """Read an H&E and an IHC file, register the IHC to the H&E and resample it at full resolution.

    Args:
        he: H&E image file (fixed).
        ihc: IHC image file (moving).
        registration: the registration to run (default: rigid, tissue channel, 256 px).

    Returns:
        ``(he_rgb, aligned_ihc_rgb, result)``, images ``(H, W, 3)`` uint8 on the H&E grid.

    Raises:
        her2_monai.data.image_reader.ImageReadError: if a file is missing or not an image (a ``ValueError`` naming
            the file).
        ValueError: if the images cannot be registered (naming both files).
    """
    fixed, moving = read_rgb(he), read_rgb(ihc)
    registration = registration or PairRegistration()
    try:
        result = registration(fixed, moving)
    except ValueError as err:
        raise ValueError(f"{he} / {ihc}: {err}") from None
    result.details["files"] = {"he": str(he), "ihc": str(ihc)}
    return fixed, warp_rgb(moving, result), result


def _pairs(dataset_dir: Path) -> tuple[list[tuple[Path, Path | None, Path]], list[Path]]:
    """``(he, ihc or None, relative path)`` for every H&E file, and IHC files that have no H&E."""
    he_root, ihc_root = dataset_dir / "HE", dataset_dir / "IHC"
    if not he_root.is_dir() or not ihc_root.is_dir():
        raise ValueError(f"{dataset_dir}: expected the BCI layout with HE/ and IHC/ folders (same file names in both)")

    def images(root: Path) -> dict[Path, Path]:
        return {
            p.relative_to(root): p
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        }

    he_files, ihc_files = images(he_root), images(ihc_root)
    pairs = [(path, ihc_files.get(rel), rel) for rel, path in he_files.items()]
    return pairs, [path for rel, path in ihc_files.items() if rel not in he_files]


def register_folder(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    transform: str = "affine",
    bspline: bool = False,
    channel: str = "tissue",
    max_side: int = 256,
    overwrite: bool = False,
    set_aside_flagged: bool = False,
    method: str = "ncc",
    pyramid_max_side: int = 1024,
) -> dict[str, Any]:
    """Write a registered copy of a BCI-layout folder: each ``IHC/<path>`` aligned to ``HE/<path>``.

    H&E files are copied unchanged; each aligned IHC is written under the same relative path and file name (in the
    format its extension names). Unpaired H&E or IHC files are copied unchanged (a missing stain is a valid record);
    unreadable files are skipped and reported. ``output_dir/registration.json`` holds the per-pair transforms and
    quality, and the returned summary.

    Args:
        dataset_dir: folder with ``HE/`` and ``IHC/`` (e.g. ``HE/test/00011_test_3+.png`` and ``IHC/test/...``).
        output_dir: destination folder (must not contain files unless ``overwrite``).
        transform: ``rigid``, ``similarity`` or ``affine``.
        bspline: add a B-spline refinement.
        channel: registration channel (see :data:`~her2_monai.registration.channels.CHANNELS`).
        max_side: registration resolution.
        overwrite: allow writing into a non-empty ``output_dir``.
        set_aside_flagged: write the pairs whose verdict is ``uncertain`` or ``failed`` under
            ``output_dir/flagged/HE`` and ``output_dir/flagged/IHC`` instead of ``HE/`` and ``IHC/``, so a datalist
            of ``output_dir`` leaves them out while a person can still review them.
        method: ``ncc`` (default) or ``itk`` (see :class:`~her2_monai.registration.pairwise.PairRegistration`).
        pyramid_max_side: ``ncc`` method: finest side the result is refined at again (``<= max_side``: none).

    Returns:
        Summary: counts (``registered``, ``identity``, ``unpaired``, ``failed``; ``failed`` = unreadable), verdict
        counts (``registered``, ``uncertain``, ``failed``), ``flagged`` (file, verdict, reasons and where it was
        written for every pair not marked ``registered``), mean NCC/NMI before and after, seconds, and ``problems``
        (file and reason for every skipped file).

    Raises:
        ValueError: if ``dataset_dir`` is not in the BCI layout.
        FileExistsError: if ``output_dir`` has files and ``overwrite`` is false.
    """
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    pairs, ihc_only = _pairs(dataset_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir}: output folder is not empty (pass overwrite=True to write into it)")
    registration = PairRegistration(
        transform=transform,
        bspline=bspline,
        channel=channel,
        max_side=max_side,
        method=method,
        pyramid_max_side=pyramid_max_side,
    )
    start = time.perf_counter()
    records, problems = [], []
    counts = {"registered": 0, "identity": 0, "unpaired": 0, "failed": 0}
    verdicts, flagged = {"registered": 0, "uncertain": 0, "failed": 0}, []
    for he, ihc, rel in pairs:
        he_out, ihc_out = output_dir / "HE" / rel, output_dir / "IHC" / rel
        if ihc is None:
            atomic_write(he_out, lambda tmp, src=he: shutil.copyfile(src, tmp))
            counts["unpaired"] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RegistrationWarning)  # reported through the status instead
                _, aligned, result = register_files(he, ihc, registration)
        except ValueError as err:  # ImageReadError is a ValueError naming the file
            problems.append({"file": str(rel), "reason": str(err)})
            counts["failed"] += 1
            logger.warning("skipped %s: %s", rel, err)
            continue
        verdicts[result.verdict] += 1
        if result.verdict != "registered":
            if set_aside_flagged:
                he_out, ihc_out = output_dir / "flagged" / "HE" / rel, output_dir / "flagged" / "IHC" / rel
            flagged.append(
                {"file": str(rel), "verdict": result.verdict, "reasons": result.verdict_reasons, "ihc": str(ihc_out)}
            )
        atomic_write(he_out, lambda tmp, src=he: shutil.copyfile(src, tmp))
        write_image(ihc_out, aligned)
        counts[result.status] += 1
        records.append({"file": str(rel), **result.to_dict()})
    for ihc in ihc_only:
        atomic_write(
            output_dir / "IHC" / ihc.relative_to(dataset_dir / "IHC"), lambda tmp, src=ihc: shutil.copyfile(src, tmp)
        )
        counts["unpaired"] += 1

    def mean(key: str) -> float | None:
        values = [r["quality"][key] for r in records]
        return float(np.mean(values)) if values else None

    summary = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output_dir),
        "transform": transform,
        "bspline": bspline,
        "counts": counts,
        "verdicts": verdicts,
        "flagged": flagged,
        "quality": {k: mean(k) for k in ("ncc_before", "ncc_after", "nmi_before", "nmi_after")},
        "seconds": time.perf_counter() - start,
        "problems": problems,
    }
    write_json(output_dir / "registration.json", {**summary, "pairs": records})
    return summary


def write_pair_outputs(output: Path, he: np.ndarray, ihc: np.ndarray, aligned: np.ndarray, result) -> dict[str, str]:
    """Write the single-pair outputs of ``python -m her2_monai register`` into ``output``.

    Files: ``ihc_registered.png`` (full resolution, on the H&E grid), ``he.png``, ``checkerboard.png`` (H&E/IHC tiles
    before | after registration, at most 512 px each) and ``registration.json``.

    Returns:
        Output name -> path.
    """
    side = 512
    before = _thumbnail(ihc, side)
    he_small = _thumbnail(he, side)
    if before.shape != he_small.shape:
        before = np.asarray(Image.fromarray(before).resize(he_small.shape[1::-1], Image.BILINEAR))
    board = np.concatenate(
        [checkerboard(he_small, before), np.full((he_small.shape[0], 8, 3), 255, np.uint8)]
        + [checkerboard(he_small, _thumbnail(aligned, side))],
        axis=1,
    )
    paths = {
        "aligned_ihc": write_image(output / "ihc_registered.png", aligned),
        "he": write_image(output / "he.png", he),
        "checkerboard": write_image(output / "checkerboard.png", board),
    }
    paths["json"] = write_json(
        output / "registration.json", {**result.to_dict(), "outputs": {k: str(v) for k, v in paths.items()}}
    )
    return {k: str(v) for k, v in paths.items()}
