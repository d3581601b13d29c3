"""Inference with the trained bundle: the deployed model, input records, predictor, evaluator and prediction files."""

from __future__ import annotations

from her2_monai.inference.batching import auto_batch_size
from her2_monai.inference.deploy import HER2Deploy
from her2_monai.inference.engine import HER2InferenceEvaluator
from her2_monai.inference.predictor import HER2Predictor, TorchScriptPredictor, load_predictor, prediction_result
from her2_monai.inference.records import (
    AssignUnknownStaind,
    check_record_files,
    collect_records,
    require_records,
)
from her2_monai.inference.stain import model_stain_references
from her2_monai.inference.writer import PredictionWriter

__all__ = [
    "auto_batch_size",
    "HER2Deploy",
    "HER2InferenceEvaluator",
    "HER2Predictor",
    "TorchScriptPredictor",
    "load_predictor",
    "prediction_result",
    "AssignUnknownStaind",
    "check_record_files",
    "collect_records",
    "require_records",
    "PredictionWriter",
    "model_stain_references",
]
