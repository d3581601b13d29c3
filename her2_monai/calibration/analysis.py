"""The trust sections of the evaluation report, per scenario: calibration, referral, out-of-distribution, MC dropout.

Everything is computed from the test outputs collected by the evaluator (raw logits, labels, embeddings) and the
calibration record stored with the model, so the report shows what the deployed model does: ``ece`` is the
calibrated (deployed) value and ``ece_uncalibrated`` the raw softmax's; ``referral`` applies the stored threshold
of the scenario; ``ood`` the stored score and threshold.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from her2_monai.calibration.metrics import calibration_summary
from her2_monai.calibration.referral import coverage_accuracy_curve, referral_outcome
from her2_monai.calibration.scorer import TrustScorer
from her2_monai.calibration.temperature import apply_temperature, scaled_nll
from her2_monai.calibration.uncertainty import mc_dropout_head
from her2_monai.metrics.classification import roc_auc

__all__ = ["thin_curve", "scenario_trust", "calibration_section"]


def thin_curve(curve: Mapping[str, list[float]], max_points: int = 200) -> dict[str, list[float]]:
    """At most ``max_points`` evenly spaced points of a coverage-accuracy curve (the last point always kept)."""
    n = len(curve["coverage"])
    if n <= max_points:
        return {k: list(v) for k, v in curve.items()}
    index = np.unique(np.r_[np.linspace(0, n - 1, max_points).round().astype(int), n - 1])
    return {k: [v[i] for i in index] for k, v in curve.items()}


def scenario_trust(
    scenario: str,
    logits: np.ndarray,
    labels: np.ndarray,
    embedding: np.ndarray | None,
    scorer: TrustScorer,
    head: nn.Module | None = None,
    mc_dropout_passes: int = 0,
    seed: int = 0,
    ood_inputs: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Calibration, referral, OOD and MC-dropout results of one scenario's test outputs.

    Args:
        scenario: scenario name.
        logits: ``(N, C)`` raw logits.
        labels: ``(N,)``.
        embedding: ``(N, D)`` pooled features (needed for Mahalanobis OOD and MC dropout).
        scorer: the model's calibration record.
        head: the classifier head (for MC dropout).
        mc_dropout_passes: MC-dropout samples (0 = off).
        seed: seed of the dropout masks.
        ood_inputs: the further inputs the recorded OOD score reads (``image_he``, ...; see
            :mod:`~her2_monai.calibration.ood_features`), ``(N, D)`` each.

    Returns:
        ``{"ece", "ece_per_class", "ece_uncalibrated", "ece_per_class_uncalibrated", "nll", "nll_uncalibrated",
        "reliability": {"uncalibrated": bins, "calibrated": bins}, "referral": {...}, "ood": {...},
        "uncertainty": {...}}``.
    """
    labels = np.asarray(labels, dtype=int)
    raw = apply_temperature(logits, 1.0)
    calibrated = apply_temperature(logits, scorer.temperature)
    before, after = calibration_summary(raw, labels), calibration_summary(calibrated, labels)
    confidence = calibrated.max(axis=1)
    correct = calibrated.argmax(axis=1) == labels
    threshold = scorer.refer_threshold(scenario)
    referral = referral_outcome(confidence, correct, threshold)
    target = (scorer.record.get("refer") or {}).get("target_accuracy")
    referral.update(
        {
            "target_accuracy": target,
            "target_met_on_validation": ((scorer.record.get("refer") or {}).get(scenario) or {}).get("target_met"),
            "curve": thin_curve(coverage_accuracy_curve(confidence, correct)),
            "recorded": scorer.calibrated,
        }
    )
    section: dict[str, Any] = {
        "ece": after["ece"],
        "ece_per_class": after["ece_per_class"],
        "ece_uncalibrated": before["ece"],
        "ece_per_class_uncalibrated": before["ece_per_class"],
        "nll": scaled_nll(logits, labels, scorer.temperature) if len(labels) else float("nan"),
        "nll_uncalibrated": before["nll"],
        "reliability": {"uncalibrated": {"bins": before["bins"]}, "calibrated": {"bins": after["bins"]}},
        "referral": referral,
    }
    ood: dict[str, Any] = {"available": scorer.has_ood, "method": scorer.ood_method}
    if scorer.has_ood and len(labels):
        try:
            scores = scorer.ood_scores(logits, embedding, ood_inputs)
        except KeyError as err:  # an evaluation that did not collect what the score reads
            ood["note"] = f"not scored: {err.args[0]}"
        else:
            ood_threshold = scorer.ood_threshold(scenario)
            ood.update(
                {
                    "threshold": ood_threshold,
                    # NaN (no evidence) passes, as at inference.
                    "pass_rate": float(np.mean(~(scores > ood_threshold))),
                    "score_mean": float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan"),
                    "score_median": float(np.nanmedian(scores)) if np.isfinite(scores).any() else float("nan"),
                }
            )
    section["ood"] = ood
    uncertainty: dict[str, Any] = {"mc_dropout_passes": int(mc_dropout_passes)}
    if mc_dropout_passes > 0 and head is not None and embedding is not None and len(labels):
        generator = torch.Generator().manual_seed(seed)
        sampled = mc_dropout_head(
            copy.deepcopy(head).cpu(), torch.as_tensor(embedding), mc_dropout_passes, scorer.temperature, generator
        )
        ent, mi = sampled["entropy"].numpy(), sampled["mutual_information"].numpy()
        wrong = ~correct
        uncertainty.update(
            {
                "layers": "head.dropout (DualPoolHead, before the final linear layer)",
                "predictive_entropy_mean": float(ent.mean()),
                "mutual_information_mean": float(mi.mean()),
                "error_auroc_entropy": roc_auc(wrong, ent),
                "error_auroc_mutual_information": roc_auc(wrong, mi),
                "error_auroc_confidence": roc_auc(wrong, -confidence),
                "mc_accuracy": float((sampled["probabilities"].numpy().argmax(axis=1) == labels).mean()),
            }
        )
    section["uncertainty"] = uncertainty
    return section


def calibration_section(
    logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], scorer: TrustScorer
) -> dict[str, Any]:
    """Top-level ``calibration`` entry of the report: the temperature, test ECE over all scenarios before and after
    scaling, and what the record says about validation.

    Args:
        logits: ``{scenario: (N, C)}`` raw test logits.
        labels: ``{scenario: (N,)}``.
        scorer: the model's calibration record.

    Returns:
        ``{"available", "temperature", "ece_before", "ece_after", "ece_per_class_before", "ece_per_class_after",
        "nll_before", "nll_after", "validation", "refer_threshold", "refer_target_accuracy", "ood_method"}``.
    """
    filled = [s for s in logits if len(labels[s])]
    section: dict[str, Any] = {
        "available": scorer.calibrated,
        "temperature": scorer.temperature,
        "refer_threshold": {s: scorer.refer_threshold(s) for s in logits},
        "refer_target_accuracy": (scorer.record.get("refer") or {}).get("target_accuracy"),
        "ood_method": scorer.ood_method,
        "validation": scorer.record.get("validation"),
    }
    if not scorer.calibrated:
        section["note"] = (
            "the model file has no calibration record (trained before calibration existed): raw softmax confidences. "
            "Fit one with: python -m monai.bundle run calibrating --config_file "
            "\"['bundle/configs/train.json','bundle/configs/evaluate.json']\""
        )
    if filled:
        all_logits = np.concatenate([logits[s] for s in filled])
        all_labels = np.concatenate([labels[s] for s in filled]).astype(int)
        before = calibration_summary(apply_temperature(all_logits, 1.0), all_labels)
        after = calibration_summary(apply_temperature(all_logits, scorer.temperature), all_labels)
        section.update(
            {
                "ece_before": before["ece"],
                "ece_after": after["ece"],
                "ece_per_class_before": before["ece_per_class"],
                "ece_per_class_after": after["ece_per_class"],
                "nll_before": before["nll"],
                "nll_after": after["nll"],
            }
        )
    return section
