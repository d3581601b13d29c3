"""Figures of the evaluation report, drawn with matplotlib (headless) and written atomically as PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from her2_monai.constants import CLASS_NAMES
from her2_monai.figures import pyplot, save_png

__all__ = ["save_confusion_matrices", "save_reliability_diagrams", "save_coverage_curves"]


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
    plt = pyplot()
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
    return save_png(fig, path)


def save_reliability_diagrams(scenarios: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """One reliability diagram per scenario: accuracy per confidence bin before and after temperature scaling.

    Args:
        scenarios: ``{scenario: report}`` whose ``reliability`` holds ``uncalibrated`` and ``calibrated`` bins
            (``confidence``, ``accuracy``, ``count`` per bin) and ``ece``/``ece_uncalibrated``.
        path: PNG to write.

    Returns:
        The PNG path.
    """
    plt = pyplot()
    names = [s for s in scenarios if scenarios[s].get("reliability")] or list(scenarios)
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        report = scenarios[name]
        reliability = report.get("reliability") or {}
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for kind, colour, label in (
            ("uncalibrated", "#e07a5f", f"raw softmax, ECE {report.get('ece_uncalibrated', float('nan')):.3f}"),
            ("calibrated", "#3d405b", f"temperature-scaled, ECE {report.get('ece', float('nan')):.3f}"),
        ):
            bins = (reliability.get(kind) or {}).get("bins") or {}
            conf = np.asarray(bins.get("confidence", []), dtype=float)
            acc = np.asarray(bins.get("accuracy", []), dtype=float)
            count = np.asarray(bins.get("count", []), dtype=float)
            filled = count > 0
            if filled.any():
                ax.plot(conf[filled], acc[filled], marker="o", color=colour, label=label)
                ax.scatter(conf[filled], acc[filled], s=10 + 90 * count[filled] / count.max(), color=colour, alpha=0.4)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (15 bins; dot size = cases)")
        ax.set_ylabel("accuracy")
        per_class = report.get("ece_per_class") or {}
        one_plus = per_class.get("1+")
        subtitle = f"n={report.get('n', 0)}" + (f", class-wise ECE 1+ {one_plus:.3f}" if one_plus is not None else "")
        ax.set_title(f"{name}\n{subtitle}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_png(fig, path)


def save_coverage_curves(scenarios: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Coverage-accuracy curves of the referral rule per scenario, with the stored operating point and target.

    Args:
        scenarios: ``{scenario: report}`` whose ``referral`` holds ``curve`` (``coverage``, ``accuracy``),
            ``coverage``, ``accuracy_kept`` and ``target_accuracy``.
        path: PNG to write.

    Returns:
        The PNG path.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    colours = {"dual": "#3d405b", "he_only": "#c06c84", "ihc_only": "#8d6e63"}
    target = None
    for name, report in scenarios.items():
        referral = report.get("referral") or {}
        curve = referral.get("curve") or {}
        if not curve.get("coverage"):
            continue
        colour = colours.get(name)
        coverage, accuracy = referral.get("coverage"), referral.get("accuracy_kept")
        threshold = referral.get("threshold", float("nan"))
        point = "every case referred" if threshold > 1.0 else f"t={threshold:.2f}, coverage {coverage:.0%}"
        ax.plot(curve["coverage"], curve["accuracy"], color=colour, label=f"{name} ({point})")
        if coverage is not None and accuracy is not None and coverage == coverage and accuracy == accuracy:
            ax.scatter([coverage], [accuracy], color=colour, edgecolor="black", zorder=3, s=50)
        target = referral.get("target_accuracy") or target
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of cases not referred)")
    ax.set_ylabel("accuracy of the cases not referred")
    ax.set_title("referral rule on the test split\n(dot: the threshold stored with the model)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return save_png(fig, path)
