"""Landmark files and the target registration error (TRE) of a fitted registration.

A registration benchmark built on displaced copies of a dataset's pairs measures the answer against the dataset's own
alignment, and consecutive sections are not aligned to the pixel (docs/registration.md). Corresponding points placed
by a person on both sections (landmarks) measure the registration itself. The files follow the ImageJ / ANHIR layout:
a CSV with a header naming ``X`` and ``Y`` columns (pixel ``x`` = column, ``y`` = row, origin at the top-left pixel),
usually after an unnamed index column; row ``i`` of the H&E file and row ``i`` of the IHC file are the same place in
the tissue. A header-less file of two (``x, y``) or three (``index, x, y``) numeric columns is read too.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from her2_monai.registration.pairwise import RegistrationResult

__all__ = ["read_landmarks", "read_landmark_pair", "landmark_errors", "landmark_summary"]


def _number(text: str, path: Path, row: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: row {row}, column {column}: expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{path}: row {row}, column {column}: expected a finite number, got {text!r}")
    return value


def read_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read a landmark CSV (ImageJ / ANHIR layout, or header-less ``x, y`` / ``index, x, y``).

    Args:
        path: the CSV file.

    Returns:
        ``(N, 2)`` float array of pixel ``(x, y)``, in file order.

    Raises:
        ValueError: naming the file (and row) when it is missing, has no ``X`` / ``Y`` columns, holds a value that is
            not a number, or has no point.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: landmark file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: no landmarks (empty file); expected a CSV with X and Y columns")
    header = [cell.strip().lower() for cell in rows[0]]
    if all(_is_number(cell) for cell in header if cell):
        width = len(rows[0])
        if width not in (2, 3):
            raise ValueError(
                f"{path}: a header-less landmark file needs 2 (x, y) or 3 (index, x, y) columns, got {width}"
            )
        columns, body, first = (width - 2, width - 1), rows, 1
    else:
        if "x" not in header or "y" not in header:
            raise ValueError(f"{path}: header {rows[0]} has no X and Y columns (ImageJ / ANHIR layout: ',X,Y')")
        columns, body, first = (header.index("x"), header.index("y")), rows[1:], 2
    points = []
    for offset, row in enumerate(body):
        number = first + offset
        if len(row) <= max(columns):
            raise ValueError(f"{path}: row {number} has {len(row)} columns, expected at least {max(columns) + 1}")
        points.append([_number(row[c].strip(), path, number, name) for c, name in zip(columns, "XY", strict=True)])
    if not points:
        raise ValueError(f"{path}: no landmarks (only a header)")
    return np.asarray(points, dtype=np.float64)


def read_landmark_pair(he: str | os.PathLike, ihc: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the H&E and the IHC landmark files of one pair (:func:`read_landmarks`), checking they correspond.

    Args:
        he: the H&E's landmark CSV.
        ihc: the IHC's landmark CSV (row i the same place as row i of ``he``).

    Returns:
        ``(he_points, ihc_points)``, each ``(N, 2)``.

    Raises:
        ValueError: as :func:`read_landmarks`, or when the two files hold different numbers of points.
    """
    he_points, ihc_points = read_landmarks(he), read_landmarks(ihc)
    if len(he_points) != len(ihc_points):
        raise ValueError(
            f"{he} has {len(he_points)} landmarks but {ihc} has {len(ihc_points)}: row i of each must be the same place"
        )
    return he_points, ihc_points


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def landmark_errors(result: RegistrationResult, he_points: np.ndarray, ihc_points: np.ndarray) -> np.ndarray:
    """Target registration error per landmark: how far the registration sends each H&E landmark from its IHC one.

    Args:
        result: a registration of this IHC to this H&E (``result.matrix``: H&E -> IHC pixel coordinates, with its
            B-spline when it has one).
        he_points: ``(N, 2)`` H&E pixel ``(x, y)``.
        ihc_points: ``(N, 2)`` IHC pixel ``(x, y)`` of the same places, in the same order.

    Returns:
        ``(N,)`` distances in IHC pixels (full resolution).

    Raises:
        ValueError: when the two sets do not have the same number of points.
    """
    he_points, ihc_points = np.asarray(he_points, float), np.asarray(ihc_points, float)
    if he_points.shape != ihc_points.shape or he_points.ndim != 2 or he_points.shape[1] != 2:
        raise ValueError(
            f"landmarks must be two (N, 2) arrays of the same N (row i of each is the same place), got "
            f"{he_points.shape} for the H&E and {ihc_points.shape} for the IHC"
        )
    return np.linalg.norm(result.map_points(he_points) - ihc_points, axis=1)


def landmark_summary(errors: np.ndarray, before: np.ndarray, shape: tuple[int, ...]) -> dict[str, float | list]:
    """The figures ``register`` prints and writes for landmarks.

    Args:
        errors: ``(N,)`` target registration errors after registration (px).
        before: ``(N,)`` the same without registration (the identity).
        shape: ``(H, W, ...)`` of the H&E, for the relative error (TRE / image diagonal, as in ANHIR).

    Returns:
        ``points``, ``tre_px`` (per landmark), ``median_px``, ``mean_px``, ``max_px``, ``median_rtre`` and
        ``median_before_px``.
    """
    diagonal = float(np.hypot(*shape[:2]))
    return {
        "points": int(errors.size),
        "tre_px": [round(float(e), 3) for e in errors],
        "median_px": float(np.median(errors)),
        "mean_px": float(np.mean(errors)),
        "max_px": float(np.max(errors)),
        "median_rtre": float(np.median(errors) / diagonal),
        "median_before_px": float(np.median(before)),
    }
