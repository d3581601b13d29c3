"""Serving the bundle's deployed predictor outside MONAI: the MLflow pyfunc model (:mod:`.mlflow_model`)."""

from __future__ import annotations

from her2_monai.serving.mlflow_model import (
    INPUT_COLUMNS,
    HER2PyfuncModel,
    find_model_version,
    log_bundle_model,
    log_datalist_inputs,
    model_requirements,
    set_experiment_kind,
    tag_model_version,
)

__all__ = [
    "INPUT_COLUMNS",
    "HER2PyfuncModel",
    "find_model_version",
    "log_bundle_model",
    "log_datalist_inputs",
    "model_requirements",
    "set_experiment_kind",
    "tag_model_version",
]
