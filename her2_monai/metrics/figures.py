"""Figures of the evaluation report, drawn with matplotlib (headless) and written atomically as PNG."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from her2_monai.constants import CLASS_NAMES
from her2_monai.fileio import atomic_write

__all__ = ["save_confusion_matrices"]


def save_confusion_matrices(
    scenarios: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> Path:
    """One panel per scenario: the confusion matrix (rows true, columns predicted), counts and row percentages.

    Args:
        scenarios: ``{scenario: classification report}`` with ``confusion_matrix`` (scenarios without samples are
            drawn empty).
        path: PNG to write.
        class_names: tick labels.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scenarios)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        report = scenarios[name]
        cm = np.asarray(report.get("confusion_matrix", np.zeros((len(class_names),) * 2)), dtype=float)
        rows = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for (i, j), count in np.ndenumerate(cm):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(count)}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8, color=colour)
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names)
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted HER2 score")
        ax.set_ylabel("true HER2 score")
        accuracy = report.get("accuracy")
        subtitle = f"n={report.get('n', 0)}" + (f", accuracy {accuracy:.1%}" if report.get("n") else "")
        ax.set_title(f"{name}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
