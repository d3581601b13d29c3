"""Classification metrics broken down by missing-stain scenario (scikit-learn does the arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from her2_monai.constants import CLASS_NAMES, NUM_CLASSES, SCENARIOS

__all__ = ["ScenarioClassificationMetric", "macro_f1", "classification_report", "roc_auc"]


def _labels_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (true, predicted) label arrays that a confusion matrix counts (rows true, columns predicted)."""
    rows, cols = np.nonzero(cm)
    counts = cm[rows, cols]
    return np.repeat(rows, counts), np.repeat(cols, counts)


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in the ground truth of a confusion matrix.

    Args:
        cm: ``(C, C)`` counts, rows = true class, columns = predicted class.

    Returns:
        The macro-F1, NaN for an empty matrix.
    """
    cm = np.asarray(cm)
    present = np.nonzero(cm.sum(1))[0]
    if present.size == 0:
        return float("nan")
    true, pred = _labels_from_confusion(cm)
    return float(f1_score(true, pred, labels=present, average="macro", zero_division=0))


class ScenarioClassificationMetric(Metric):
    """Accuracy or macro-F1 of one scenario, or the mean over scenarios, from ``ScenarioEvaluator`` outputs.

    The state is one confusion matrix per scenario -- the sufficient statistic for both metrics, and one that sums
    across processes under DDP (ignite ``sync_all_reduce``), so every rank gets the full-set value.

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
            pred = logits[name].argmax(dim=1).cpu().numpy()
            cm = confusion_matrix(labels[name].cpu().numpy(), pred, labels=list(range(NUM_CLASSES)))
            self._cm[s] += torch.as_tensor(cm, dtype=torch.long, device=self._device)

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


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` from the rest (scikit-learn's, ties averaged).

    Args:
        positive: ``(N,)`` bool, the positive group.
        scores: ``(N,)`` scores, higher meaning more likely positive.

    Returns:
        The AUC in ``[0, 1]``; NaN when one of the two groups is empty (undefined), so a one-class scenario reports
        no AUC rather than failing.
    """
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


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
    classes = list(range(len(class_names)))
    cm = confusion_matrix(label, pred, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(label, pred, labels=classes, zero_division=0)
    per_class = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auc": roc_auc(label == c, probabilities[:, c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(class_names)
    }
    low = np.isin(label, [0, 1])
    her2_low_auc = roc_auc(label[low] == 1, probabilities[low, 1] - probabilities[low, 0]) if low.any() else None
    return {
        "n": int(len(label)),
        "accuracy": float((pred == label).mean()) if len(label) else float("nan"),
        "macro_f1": macro_f1(cm),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "auc_0_vs_1plus": her2_low_auc,
        "her2_low_auc_0_vs_1plus": her2_low_auc,
    }
