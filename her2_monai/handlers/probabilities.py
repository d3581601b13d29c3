"""Keeping every test sample's class probabilities and label per scenario, for reports and later analyses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from her2_monai.constants import NUM_CLASSES, SCENARIOS
from her2_monai.metrics.classification import classification_report

__all__ = ["ScenarioProbabilityCollector"]


class ScenarioProbabilityCollector:
    """Ignite handler that keeps the class probabilities and labels of every sample, per scenario.

    Attach to a :class:`~her2_monai.engines.evaluators.ScenarioEvaluator` (``decollate=False``): its output per
    iteration is ``{"logits": {scenario: (N, 4)}, "label": {scenario: (N,)}, ...}``. The arrays stay available after
    the run (:attr:`probabilities`, :attr:`logits`, :attr:`labels`, and :meth:`output` for any further per-scenario
    output such as ``embedding`` or ``stain_attention``) for later analyses such as calibration.

    Args:
        scenarios: scenarios to collect, in report order.
    """

    def __init__(self, scenarios: Sequence[str] = SCENARIOS) -> None:
        self.scenarios = tuple(scenarios)
        self._probs: dict[str, list[np.ndarray]] = {}
        self._labels: dict[str, list[np.ndarray]] = {}
        self._extra: dict[str, dict[str, list[np.ndarray]]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self._probs = {s: [] for s in self.scenarios}
        self._labels = {s: [] for s in self.scenarios}
        self._extra = {}

    def attach(self, engine: Engine) -> None:
        """Reset when a run starts and collect after every iteration."""
        engine.add_event_handler(Events.STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, Mapping) or "logits" not in output or "label" not in output:
            raise TypeError(
                "ScenarioProbabilityCollector expects ScenarioEvaluator outputs {'logits': ..., 'label': ...}"
            )
        for scenario in self.scenarios:
            if scenario not in output["logits"]:
                continue
            logits = torch.as_tensor(output["logits"][scenario]).detach().float()
            self._probs[scenario].append(logits.softmax(dim=1).cpu().numpy())
            self._labels[scenario].append(torch.as_tensor(output["label"][scenario]).detach().cpu().numpy())
            for key, values in output.items():
                if key in ("label",) or not isinstance(values, Mapping) or scenario not in values:
                    continue
                array = torch.as_tensor(values[scenario]).detach().float().cpu().numpy()
                self._extra.setdefault(key, {s: [] for s in self.scenarios})[scenario].append(array)

    @property
    def probabilities(self) -> dict[str, np.ndarray]:
        """``{scenario: (N, 4)}`` softmax probabilities (``(0, 4)`` when the scenario had no sample)."""
        return {s: np.concatenate(p) if p else np.zeros((0, NUM_CLASSES)) for s, p in self._probs.items()}

    @property
    def logits(self) -> dict[str, np.ndarray]:
        """``{scenario: (N, 4)}`` raw logits."""
        return self.output("logits")

    def output(self, key: str) -> dict[str, np.ndarray]:
        """``{scenario: (N, ...)}`` of a collected network output (``logits``, ``embedding``, ...).

        Raises:
            KeyError: if the evaluator did not return ``key``.
        """
        if key not in self._extra:
            raise KeyError(f"'{key}' was not collected; the evaluator returned {sorted(self._extra)}")
        return {s: np.concatenate(v) if v else np.zeros((0,)) for s, v in self._extra[key].items()}

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """``{scenario: (N,)}`` true classes."""
        return {s: np.concatenate(v).astype(int) if v else np.zeros((0,), int) for s, v in self._labels.items()}

    def reports(self) -> dict[str, dict[str, Any]]:
        """``{scenario: classification_report}`` (accuracy, macro-F1, per-class P/R/F1/AUC, confusion matrix,
        HER2-low AUC); a scenario without samples reports ``{"n": 0}``."""
        probs, labels = self.probabilities, self.labels
        return {s: classification_report(probs[s], labels[s]) if len(labels[s]) else {"n": 0} for s in self.scenarios}
