"""Inference with the trained bundle: deploy network, input records, predictor, evaluator and prediction files."""

from __future__ import annotations

from her2_monai.inference.engine import HER2InferenceEvaluator
from her2_monai.inference.network import (
    SELECTOR_COMMAND,
    TRAIN_COMMAND,
    BundleWeightsLoader,
    HER2BundleNet,
    TracedDeployDispatcher,
    load_bundle_weights,
)
from her2_monai.inference.predictor import HER2Predictor, forward_stain_batch, load_predictor, prediction_result
from her2_monai.inference.records import (
    AssignUnknownStaind,
    check_record_files,
    collect_records,
    inference_transforms,
    require_records,
)
from her2_monai.inference.writer import PredictionWriter, json_safe, write_json_atomic

__all__ = [
    "HER2InferenceEvaluator",
    "SELECTOR_COMMAND",
    "TRAIN_COMMAND",
    "BundleWeightsLoader",
    "HER2BundleNet",
    "TracedDeployDispatcher",
    "load_bundle_weights",
    "HER2Predictor",
    "forward_stain_batch",
    "load_predictor",
    "prediction_result",
    "AssignUnknownStaind",
    "check_record_files",
    "collect_records",
    "inference_transforms",
    "require_records",
    "PredictionWriter",
    "json_safe",
    "write_json_atomic",
]
