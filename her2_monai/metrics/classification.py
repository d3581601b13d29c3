"""Classification metrics broken down by missing-stain scenario."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from her2_monai.constants import CLASS_NAMES, NUM_CLASSES, SCENARIOS

__all__ = ["ScenarioClassificationMetric", "confusion_matrix", "macro_f1", "classification_report"]


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``(C, C)`` counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(label, int), np.asarray(pred, int)), 1)
    return cm


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in the ground truth of ``cm``."""
    present = cm.sum(1) > 0
    if not present.any():
        return float("nan")
    return float(_per_class(cm)[2][present].mean())


class ScenarioClassificationMetric(Metric):
    """Accuracy or macro-F1 of one scenario, or the mean over scenarios, from :class:`ScenarioEvaluator` outputs.

    Confusion matrices are accumulated per scenario (and summed across processes under DDP).

    Args:
        kind: ``"accuracy"`` or ``"macro_f1"``.
        scenario: one of :data:`~her2_monai.constants.SCENARIOS`, or ``None`` for the mean over the scenarios
            that had samples.
        output_transform: ignite output transform (default: identity).
        device: where the accumulators live.

    Raises:
        ValueError: for an unknown ``kind`` or ``scenario``.
    """

    required_output_keys = ("logits", "label")

    def __init__(
        self,
        kind: str = "macro_f1",
        scenario: str | None = None,
        output_transform: Any = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        if kind not in ("accuracy", "macro_f1"):
            raise ValueError(f"kind must be 'accuracy' or 'macro_f1', got '{kind}'")
        if scenario is not None and scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario '{scenario}'; expected one of {SCENARIOS} or None")
        self.kind = kind
        self.scenario = scenario
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._cm = torch.zeros(len(SCENARIOS), NUM_CLASSES, NUM_CLASSES, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        logits, labels = output
        for s, name in enumerate(SCENARIOS):
            if name not in logits:
                continue
            pred = logits[name].argmax(dim=1).to(self._device)
            label = labels[name].to(self._device)
            index = label * NUM_CLASSES + pred
            self._cm[s] += torch.bincount(index, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)

    @sync_all_reduce("_cm")
    def compute(self) -> float:
        names = [self.scenario] if self.scenario else list(SCENARIOS)
        values = []
        for name in names:
            cm = self._cm[SCENARIOS.index(name)].cpu().numpy()
            if cm.sum() == 0:
                continue
            values.append(np.trace(cm) / cm.sum() if self.kind == "accuracy" else macro_f1(cm))
        return float(np.mean(values)) if values else float("nan")


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC via the rank-sum statistic; NaN when one of the two groups is empty."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    sorted_scores = scores[order]
    # average ranks for ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(
    probabilities: np.ndarray, label: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/AUC, the confusion matrix and the HER2-low (0 vs 1+) AUC.

    Args:
        probabilities: ``(N, C)`` class probabilities.
        label: ``(N,)`` true class indices.
        class_names: names of the ``C`` classes.

    Returns:
        A JSON-serialisable dict.
    """
    probabilities = np.asarray(probabilities, float)
    label = np.asarray(label, int)
    pred = probabilities.argmax(1)
    cm = confusion_matrix(pred, label, len(class_names))
    precision, recall, f1 = _per_class(cm)
    per_class = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auc": _binary_auc(probabilities[:, c], label == c),
            "support": int(cm[c].sum()),
        }
        for c, name in enumerate(class_names)
    }
    low = np.isin(label, [0, 1])
    her2_low_auc = _binary_auc(probabilities[low, 1] - probabilities[low, 0], label[low] == 1) if low.any() else None
    return {
        "n": int(len(label)),
        "accuracy": float((pred == label).mean()) if len(label) else float("nan"),
        "macro_f1": macro_f1(cm),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "her2_low_auc_0_vs_1plus": her2_low_auc,
    }
