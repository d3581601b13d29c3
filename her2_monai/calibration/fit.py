"""Fitting a trained model's calibration record: temperature, referral thresholds and the out-of-distribution score.

:func:`fit_calibration` is the arithmetic on collected outputs; :class:`CalibrationFitter` collects them from the
validation and training splits with the model in ``models/model.pt`` and stores the record in that file. It runs as
a handler at the end of stage 2 (on the trainer's ``COMPLETED`` event, when ``model.pt`` holds the best model) and
alone as the bundle's ``calibrating`` workflow.

What is fitted on what:

* temperature: validation logits of all three scenarios pooled (NLL);
* referral threshold per scenario: calibrated validation confidences, the lowest threshold whose kept cases reach
  ``target_accuracy``;
* OOD score statistics: training cases (without augmentation; at most ``max_train_samples``) in all scenarios
  (for the per-stain image statistics of the default ``image_stats`` score, each training image of each stain);
  its threshold per scenario from the validation scores alone (:func:`~her2_monai.calibration.ood.ood_threshold`):
  the split-conformal ``ood_pass_rate`` rank, widened by ``ood_margin`` -- so at least that share of in-distribution
  validation cases passes, and new in-distribution cases are not refused for landing just past a tail quantile that
  a few dozen cases estimate poorly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from torch import nn

from her2_monai.calibration.metrics import calibration_summary
from her2_monai.calibration.ood import build_ood, ood_rank_capped, ood_threshold
from her2_monai.calibration.ood_features import BASE_INPUTS, ImageStatistics, classify_scenarios
from her2_monai.calibration.record import CALIBRATION_VERSION, write_calibration
from her2_monai.calibration.referral import choose_refer_threshold
from her2_monai.calibration.temperature import apply_temperature, fit_temperature, scaled_nll
from her2_monai.constants import LABEL_KEY, SCENARIOS
from her2_monai.fileio import write_json_atomic
from her2_monai.networks.factory import build_model
from her2_monai.stain_batch import autocast, prepare_stain_batch

__all__ = ["ScenarioOutputs", "collect_scenario_outputs", "fit_calibration", "CalibrationFitter"]

logger = logging.getLogger(__name__)

#: ``{scenario: {"logits": (N, C), "label": (N,), "embedding": (N, D), ...}}`` numpy arrays.
ScenarioOutputs = dict[str, dict[str, np.ndarray]]


@torch.no_grad()
def collect_scenario_outputs(
    network: nn.Module,
    loader: Any,
    device: torch.device | str = "cpu",
    scenarios: Sequence[str] = SCENARIOS,
    keys: Sequence[str] = ("logits", "embedding"),
    amp: bool = False,
    ood_inputs: Sequence[str] = (),
) -> ScenarioOutputs:
    """Run a classifier over labelled batches once per scenario and keep the named outputs.

    The scenario loop is :func:`~her2_monai.calibration.ood_features.classify_scenarios`, the one the
    :class:`~her2_monai.engines.evaluators.ScenarioEvaluator` runs too. That evaluator and its
    :class:`~her2_monai.handlers.probabilities.ScenarioProbabilityCollector` are not used here: ``engines`` imports
    ``calibration`` (the evaluator computes the OOD inputs), so the reverse import would be a cycle, and the evaluator
    hands OOD inputs on as float32 tensors where the calibration fit reads them in float64 (its fitted thresholds
    would move).

    Args:
        network: ``forward(he, ihc, mask) -> dict`` (a :class:`~her2_monai.networks.her2net.HER2FlexibleNet`).
        loader: batches of the bundle's stain preprocessing.
        device: where to run.
        scenarios: scenarios to simulate.
        keys: network outputs to keep.
        amp: mixed precision.
        ood_inputs: further OOD inputs to compute per call (``image_he``, ``stages_ihc``, ...; see
            :mod:`~her2_monai.calibration.ood_features`).

    Returns:
        :data:`ScenarioOutputs` (``label`` included).
    """
    extra = [name for name in ood_inputs if name not in keys]
    parts: dict[str, dict[str, list[np.ndarray]]] = {s: {k: [] for k in (*keys, *extra, LABEL_KEY)} for s in scenarios}
    statistics = ImageStatistics()
    network.eval()
    for batchdata in loader:
        batch = prepare_stain_batch(batchdata, device)
        with autocast(device, amp):
            for scenario, selected, out, inputs in classify_scenarios(
                network, batch, scenarios, extra, image_statistics=statistics
            ):
                for key in keys:
                    parts[scenario][key].append(out[key].float().cpu().numpy())
                for key in extra:
                    parts[scenario][key].append(inputs[key])
                parts[scenario][LABEL_KEY].append(batch[LABEL_KEY][selected].cpu().numpy())
    return {
        s: {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in part.items()}
        for s, part in parts.items()
        if part[LABEL_KEY]
    }


def _pooled(outputs: ScenarioOutputs, key: str) -> np.ndarray:
    return np.concatenate([outputs[s][key] for s in outputs])


def fit_calibration(
    validation: ScenarioOutputs,
    training: ScenarioOutputs,
    target_accuracy: float = 0.95,
    ood_method: str = "mahalanobis",
    ood_pass_rate: float = 0.95,
    ood_options: Mapping[str, Any] | None = None,
    ood_margin: float = 0.0,
    ood_finite_sample: bool = False,
) -> dict[str, Any]:
    """The calibration record (see :mod:`her2_monai.calibration.record`) from collected outputs.

    Args:
        validation: validation outputs per scenario (``logits``, ``label``, ``embedding`` and the OOD inputs the
            score reads).
        training: training outputs per scenario (the same keys), for the OOD statistics.
        target_accuracy: accuracy the non-referred validation cases must reach.
        ood_method: a name of :data:`~her2_monai.calibration.ood.OOD_METHODS` (``none``: no OOD score).
        ood_pass_rate: share of in-distribution validation cases that pass the OOD threshold.
        ood_options: keyword arguments of the OOD score (e.g. ``components``).
        ood_margin: widening of each threshold (see :func:`~her2_monai.calibration.ood.ood_threshold`).
        ood_finite_sample: the split-conformal rank of the threshold (see the same).

    Returns:
        The record.

    Raises:
        ValueError: without validation outputs.
    """
    if not validation:
        raise ValueError("no labelled validation cases to calibrate on")
    logits, labels = _pooled(validation, "logits"), _pooled(validation, LABEL_KEY).astype(int)
    temperature = fit_temperature(logits, labels)
    raw = apply_temperature(logits, 1.0)
    calibrated = apply_temperature(logits, temperature)
    summary_before, summary_after = calibration_summary(raw, labels), calibration_summary(calibrated, labels)
    record: dict[str, Any] = {
        "version": CALIBRATION_VERSION,
        "temperature": temperature,
        "refer_threshold": {},
        "refer": {"target_accuracy": float(target_accuracy)},
        "validation": {
            "n": {s: int(len(v[LABEL_KEY])) for s, v in validation.items()},
            "ece_before": summary_before["ece"],
            "ece_after": summary_after["ece"],
            "ece_per_class_before": summary_before["ece_per_class"],
            "ece_per_class_after": summary_after["ece_per_class"],
            "nll_before": scaled_nll(logits, labels, 1.0),
            "nll_after": scaled_nll(logits, labels, temperature),
        },
        "n_training": int(sum(len(v[LABEL_KEY]) for v in training.values())),
    }
    for scenario, part in validation.items():
        probs = apply_temperature(part["logits"], temperature)
        correct = probs.argmax(axis=1) == part[LABEL_KEY].astype(int)
        choice = choose_refer_threshold(probs.max(axis=1), correct, target_accuracy)
        record["refer_threshold"][scenario] = choice["threshold"]
        record["refer"][scenario] = choice
    if ood_method != "none":
        scorer = build_ood(ood_method, **dict(ood_options or {}))
        if training:
            pooled = {key: _pooled(training, key) for key in scorer.requires if key in next(iter(training.values()))}
            scorer.fit_inputs(pooled, _pooled(training, LABEL_KEY))
        thresholds, pass_rates = {}, {}
        for scenario, part in validation.items():
            scores = scorer.score_inputs(part)
            thresholds[scenario] = ood_threshold(scores, ood_pass_rate, ood_margin, ood_finite_sample)
            if ood_rank_capped(int(np.isfinite(scores).sum()), ood_pass_rate, ood_finite_sample):
                logger.warning(
                    "out of distribution %s: %d validation cases cannot promise a pass rate of %.2f; the threshold "
                    "is the largest validation score%s",
                    scenario,
                    int(np.isfinite(scores).sum()),
                    ood_pass_rate,
                    f" widened by the margin {ood_margin}" if ood_margin else "",
                )
            # NaN (no evidence, e.g. a stain training never had) passes, as at inference.
            pass_rates[scenario] = float(np.mean(~(scores > thresholds[scenario])))
        record["ood"] = {
            "method": scorer.name,
            "pass_rate": float(ood_pass_rate),
            "margin": float(ood_margin),
            "finite_sample": bool(ood_finite_sample),
            "thresholds": thresholds,
            "validation_pass_rate": pass_rates,
            "state": scorer.state(),
        }
    return record


def _subsample(records: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    records = list(records)
    if limit is None or limit <= 0 or len(records) <= limit:
        return records
    index = np.sort(np.random.default_rng(seed).choice(len(records), size=limit, replace=False))
    return [records[i] for i in index]


class CalibrationFitter:
    """Fit the calibration record of ``model_file`` and store it there (atomically).

    Use it as a handler of the stage-2 trainer (``attach``: runs on ``COMPLETED``, when the best model has been
    written) or call :meth:`run` (the bundle's ``calibrating`` workflow).

    Args:
        model_file: ``models/model.pt``.
        val_records: labelled validation records (``he``/``ihc``/``label``).
        train_records: labelled training records (for the OOD statistics).
        preprocessing: the evaluation preprocessing (no augmentation) of one record.
        device: where to run.
        batch_size: records per forward pass.
        num_workers: data-loader workers.
        target_accuracy: accuracy of the non-referred validation cases.
        ood_method: a name of :data:`~her2_monai.calibration.ood.OOD_METHODS`, or ``none`` (default: the bundle's,
            ``image_stats``, chosen in ``docs/ood.md``).
        ood_pass_rate: share of in-distribution validation cases that pass.
        ood_components: principal components of the ``mahalanobis`` score.
        ood_margin: widening of each OOD threshold (see :func:`~her2_monai.calibration.ood.ood_threshold`).
        ood_finite_sample: the split-conformal rank of the OOD threshold (see the same).
        ood_options: further keyword arguments of the OOD score (e.g. ``{"members": [...]}`` of a ``union``).
        max_train_samples: training records used for the OOD statistics (a seeded subsample above it).
        amp: mixed precision.
        summary_file: optional JSON copy of the record's summary (without the OOD statistics), for MLflow.
        seed: seed of the subsample.
        network_builder: ``model_file -> network`` (default: rebuild it from the file's record).
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        val_records: Sequence[Mapping[str, Any]],
        train_records: Sequence[Mapping[str, Any]],
        preprocessing: Callable,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        target_accuracy: float = 0.95,
        ood_method: str = "image_stats",
        ood_pass_rate: float = 0.95,
        ood_components: int = 64,
        max_train_samples: int | None = 2000,
        ood_margin: float = 1.0,
        ood_finite_sample: bool = True,
        ood_options: Mapping[str, Any] | None = None,
        amp: bool = False,
        summary_file: str | os.PathLike | None = None,
        seed: int = 0,
        network_builder: Callable[[str | os.PathLike], nn.Module] | None = None,
    ) -> None:
        if not 0.0 < float(target_accuracy) <= 1.0:
            raise ValueError(f"refer_target_accuracy must be in (0, 1], got {target_accuracy}")
        self.model_file = Path(model_file)
        self.val_records = list(val_records)
        self.train_records = _subsample(train_records, max_train_samples, seed)
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.target_accuracy = float(target_accuracy)
        self.ood_method = ood_method
        self.ood_pass_rate = float(ood_pass_rate)
        self.ood_components = int(ood_components)
        self.ood_margin = float(ood_margin)
        self.ood_finite_sample = bool(ood_finite_sample)
        self.ood_options = dict(ood_options or {})
        if self.ood_method == "mahalanobis":
            self.ood_options.setdefault("components", self.ood_components)
        # Built once here so a wrong method or option fails before any data is read.
        self._ood_requires: tuple[str, ...] = ()
        if self.ood_method != "none":
            self._ood_requires = tuple(build_ood(self.ood_method, **self.ood_options).requires)
        self.amp = bool(amp)
        self.summary_file = Path(summary_file) if summary_file else None
        self.network_builder = network_builder or (lambda path: build_model(path))
        self.record: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Fit when ``engine`` completes (the stage-2 trainer); without validation records, warn and skip."""
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_completed(self, engine: Engine) -> None:
        if not self.val_records:
            logger.warning(
                "no validation split: %s is not calibrated (raw softmax confidences, referral at 0.5, no OOD score)",
                self.model_file,
            )
            return
        self.run()

    def _outputs(self, network: nn.Module, records: Sequence[Mapping[str, Any]]) -> ScenarioOutputs:
        if not records:
            return {}
        loader = DataLoader(
            Dataset(list(records), self.preprocessing), batch_size=self.batch_size, num_workers=self.num_workers
        )
        extra = [name for name in self._ood_requires if name not in BASE_INPUTS]
        return collect_scenario_outputs(network, loader, self.device, amp=self.amp, ood_inputs=extra)

    def run(self) -> dict[str, Any]:
        """Collect, fit and store.

        Returns:
            The calibration record.

        Raises:
            FileNotFoundError: if the model file is missing.
            ValueError: without labelled validation records.
        """
        if not self.val_records:
            raise ValueError("calibration needs labelled validation records (the datalist's 'validation' split)")
        network = self.network_builder(self.model_file).to(self.device)
        validation = self._outputs(network, self.val_records)
        fits_statistics = self.ood_method not in ("none", "msp", "energy")
        training = self._outputs(network, self.train_records) if fits_statistics else {}
        record = fit_calibration(
            validation,
            training,
            self.target_accuracy,
            self.ood_method,
            self.ood_pass_rate,
            self.ood_options,
            self.ood_margin,
            self.ood_finite_sample,
        )
        write_calibration(self.model_file, record)
        self.record = record
        val = record["validation"]
        logger.info(
            "calibration stored in %s: temperature %.3f, validation ECE %.4f -> %.4f, NLL %.4f -> %.4f",
            self.model_file,
            record["temperature"],
            val["ece_before"],
            val["ece_after"],
            val["nll_before"],
            val["nll_after"],
        )
        for scenario, choice in record["refer"].items():
            if isinstance(choice, Mapping):
                logger.info(
                    "refer %-8s threshold %.3f: validation coverage %.2f, accuracy %s (target %.2f%s)",
                    scenario,
                    min(choice["threshold"], 1.0),
                    choice["coverage"],
                    choice["accuracy"],
                    self.target_accuracy,
                    "" if choice["target_met"] else ", not reachable: every case referred",
                )
        ood = record.get("ood") or {}
        for scenario, threshold in (ood.get("thresholds") or {}).items():
            logger.info(
                "out of distribution %-8s (%s): threshold %.4g, validation pass rate %.2f%s",
                scenario,
                ood["method"],
                threshold,
                ood["validation_pass_rate"][scenario],
                "" if np.isfinite(threshold) else " (no validation score: no refusal)",
            )
        if self.summary_file is not None:
            summary = {k: v for k, v in record.items() if k != "ood"}
            if "ood" in record:
                summary["ood"] = {k: v for k, v in record["ood"].items() if k != "state"}
            write_json_atomic(summary, self.summary_file)
        return record
