"""The shared figure plumbing: a headless pyplot and an atomic PNG write, as the report figures use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from her2_monai.figures import pyplot, save_png
from her2_monai.fileio import TEMP_PREFIX
from her2_monai.metrics.classification import classification_report
from her2_monai.metrics.figures import save_confusion_matrices

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_save_png_writes_a_whole_png_closes_the_figure_and_leaves_no_temporary(tmp_path: Path) -> None:
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "sub" / "line.png", dpi=50)
    assert path.read_bytes().startswith(_PNG_SIGNATURE)
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def test_confusion_matrix_figure_is_written_through_the_shared_helper(tmp_path: Path) -> None:
    probabilities = np.eye(4)[[0, 1, 2, 3, 3]]
    report = classification_report(probabilities, np.array([0, 1, 2, 3, 2]))
    path = save_confusion_matrices({"dual": report, "he_only": {}}, tmp_path / "confusion.png")
    assert path.read_bytes().startswith(_PNG_SIGNATURE)
