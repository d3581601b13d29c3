"""Synthetic geometry and stains shared by the registration tests."""

from __future__ import annotations

import math

import numpy as np


def similarity(angle_deg: float, scale: float, shift: tuple[float, float], size: int) -> np.ndarray:
    """``(3, 3)`` rotation by ``angle_deg`` and scaling about the centre of a ``size`` x ``size`` image, then
    ``shift`` (px)."""
    a = math.radians(angle_deg)
    matrix = np.eye(3)
    matrix[:2, :2] = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    center = np.full(2, (size - 1) / 2)
    matrix[:2, 2] = center - matrix[:2, :2] @ center + np.asarray(shift)
    return matrix


def stains(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like (purple) and an IHC-like (brown on pale blue) RGB rendering of the same ``(H, W)`` tissue in
    ``[0, 1]``."""
    tissue = tissue[..., None]
    he = (255 - tissue * np.array([90.0, 160.0, 60.0])).astype(np.uint8)
    ihc = (250 - tissue * np.array([60.0, 110.0, 150.0])).astype(np.uint8)
    return he, ihc
