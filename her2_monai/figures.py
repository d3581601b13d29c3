"""The matplotlib plumbing every figure of the package shares: a headless ``pyplot`` and an atomic PNG write."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from her2_monai.fileio import atomic_write

__all__ = ["pyplot", "save_png"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend (imported on first use: matplotlib is slow to import).

    Returns:
        The ``matplotlib.pyplot`` module.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Render a figure to PNG, close it, and write the file atomically (a reader never sees half a PNG).

    Args:
        fig: a matplotlib figure.
        path: PNG to write; its folder is created.
        dpi: resolution.

    Returns:
        The written path.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
