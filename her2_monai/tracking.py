"""MLflow beyond MONAI's ``MLFlowHandler``: the resolved config of every run, and the evaluation run.

* :func:`save_run_config` writes the configuration a bundle workflow runs with -- the merged config files with every
  command-line override applied, as MONAI's own ``--tracking`` option saves it -- so each stage's ``MLFlowHandler``
  logs it as an artifact.
* :func:`log_evaluation_run` records an evaluation as its own MLflow run (metrics from ``metrics.json``, the report
  and its figures as artifacts), linked to the training run it evaluates: the stage-2 run found by name becomes its
  parent (``mlflow.parentRunId``, so the MLflow UI nests it) and is named in the ``training_run_id`` tag.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from her2_monai.fileio import write_json_atomic

__all__ = [
    "current_bundle_config",
    "save_run_config",
    "flatten_metrics",
    "find_run",
    "log_evaluation_run",
    "default_inference_config",
    "version_metric_tags",
    "log_training_model",
    "log_evaluation_model",
]

logger = logging.getLogger(__name__)


def current_bundle_config() -> dict[str, Any] | None:
    """The raw config (files merged, overrides applied) of the MONAI bundle workflow being parsed, or ``None``.

    Config expressions are evaluated inside :meth:`monai.bundle.ConfigParser.get_parsed_content`; the parser is found
    on the call stack, as the expressions themselves have no handle on it.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigParser):
                return candidate.get()
            frame = frame.f_back
    finally:
        del frame
    return None


def save_run_config(path: str | os.PathLike) -> str:
    """Write the running workflow's resolved config to ``path`` (JSON, atomically) for the MLflow handlers.

    Args:
        path: destination file.

    Returns:
        ``path`` as a string (also when no workflow is running: then nothing is written and the handler skips it).
    """
    config = current_bundle_config()
    if config is None:
        logger.warning("no bundle config is being parsed: %s not written", path)
        return str(path)
    write_json_atomic(config, path)
    return str(path)


def _metric_name(parts: Iterable[str]) -> str:
    name = ".".join(str(p) for p in parts).replace("+", "plus")
    return re.sub(r"[^\w.\-/ ]", "_", name)


def flatten_metrics(
    report: Mapping[str, Any], skip: Iterable[str] = ("confusion_matrix", "curve", "bins", "provenance")
) -> dict:
    """Numeric leaves of a nested report as MLflow metric names (``scenarios.dual.accuracy``; ``1+`` -> ``1plus``).

    Args:
        report: nested dicts.
        skip: keys whose subtree is left out (arrays shown as figures instead; the training-data counts of
            ``provenance`` are facts about the model, not measurements: the run's tags name them).

    Returns:
        ``{name: float}`` (booleans and non-finite values left out).
    """
    skip = set(skip)
    out: dict[str, float] = {}

    def walk(value: Any, parts: tuple[str, ...]) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key not in skip:
                    walk(item, (*parts, str(key)))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            if number == number and abs(number) != float("inf"):
                out[_metric_name(parts)] = number

    walk(report, ())
    return out


def find_run(client: Any, experiment_id: str, run_name: str) -> Any | None:
    """The latest run of an experiment with that name (``None`` if there is none)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def log_evaluation_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    report: Mapping[str, Any],
    artifacts: Iterable[str | os.PathLike],
    training_run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    kind: str = "evaluation",
) -> str:
    """Record an evaluation (or another run over a trained model, e.g. a WSI cohort) as an MLflow run linked to its
    training run.

    Args:
        tracking_uri: MLflow tracking URI (e.g. ``sqlite:///.../mlruns.db``).
        experiment_name: experiment (created when missing, artifacts next to a SQLite store as MONAI does).
        run_name: name of the evaluation run.
        report: the evaluation report (``metrics.json`` content); its numeric leaves become metrics.
        artifacts: files and folders to log (missing ones are skipped).
        training_run_name: name of the training run evaluated (its latest run becomes the parent).
        params: parameters to log.
        tags: more tags (e.g. the model's training data, :func:`~her2_monai.data.provenance.provenance_tags`).
        kind: the run's ``her2_monai.kind`` tag (``evaluation``, ``wsi_cohort``).

    Returns:
        The evaluation run's id.
    """
    import mlflow
    from mlflow.entities import Metric, Param
    from monai.utils import path_to_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = path_to_uri(Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns")
        experiment_id = client.create_experiment(experiment_name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    from her2_monai.serving.mlflow_model import set_experiment_kind

    set_experiment_kind(client, experiment_id)
    tags = {**{str(k): str(v) for k, v in (tags or {}).items()}, "her2_monai.kind": kind}
    parent = find_run(client, experiment_id, training_run_name) if training_run_name else None
    if parent is not None:
        tags.update({"mlflow.parentRunId": parent.info.run_id, "training_run_id": parent.info.run_id})
        tags["training_run_name"] = str(training_run_name)
    elif training_run_name:
        logger.warning(
            "no MLflow run named '%s': the evaluation run is not linked to a training run", training_run_name
        )
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in flatten_metrics(report).items()]
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start : start + 500])
        if params:
            client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
        for path in artifacts:
            path = Path(path)
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    logger.info(
        "evaluation logged to MLflow run %s (%s)%s",
        run_name,
        run_id,
        f", child of {parent.info.run_id}" if parent else "",
    )
    return run_id


#: Evaluation metrics copied to the registered model version's tags (per scenario and overall).
VERSION_METRICS = re.compile(r"^(scenarios\.)?(\w+\.)?(accuracy|macro_f1|balanced_accuracy|ece_after|auc)$")


def default_inference_config(bundle_root: str | os.PathLike) -> str:
    """``<bundle_root>/configs/inference.json`` when it exists, else the one of the bundle this package ships with."""
    own = Path(bundle_root) / "configs" / "inference.json"
    if own.is_file():
        return str(own)
    return str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json")


def version_metric_tags(report: Mapping[str, Any], prefix: str = "eval.") -> dict[str, str]:
    """The headline evaluation metrics of a report as model-version tags (``eval.scenarios.dual.accuracy``, ...).

    Args:
        report: the evaluation report (``metrics.json`` content).
        prefix: tag name prefix.

    Returns:
        ``{tag: value}`` with values formatted to 6 significant digits.
    """
    return {f"{prefix}{k}": f"{v:.6g}" for k, v in flatten_metrics(report).items() if VERSION_METRICS.match(k)}


def _log_model_safely(action: str, call: Any, tracking_uri: str) -> dict[str, Any] | None:
    """Run a model-logging step; a failing store or registry costs a warning, not the finished run."""
    from her2_monai.handlers.tracking import store_failed

    if store_failed(tracking_uri):
        logger.warning("MLflow %s skipped: the store %s failed earlier in this run", action, tracking_uri)
        return None
    try:
        return call()
    except Exception as err:  # the weights are written: a tracking failure must not fail the run that made them
        logger.warning("MLflow %s failed (%s: %s); models/model.pt is unaffected", action, type(err).__name__, err)
        return None


def log_training_model(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    model_file: str | os.PathLike,
    inference_config: str | os.PathLike,
    registered_model_name: str | None,
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    package_requirement: str | None = None,
    input_runs: Sequence[str] = (),
) -> dict[str, Any] | None:
    """At the end of stage 2: log the datalist (``mlflow.log_input``) and the calibrated predictor as a pyfunc model
    into the stage-2 run, register the model, and tag the experiment as model training.

    Args:
        tracking_uri: the MLflow store.
        experiment_name: the bundle's experiment.
        run_name: the stage-2 run's name (its latest run gets the model).
        model_file: ``models/model.pt`` after calibration.
        inference_config: the ``inference.json`` deployed with it.
        registered_model_name: Model Registry name (empty = not registered).
        datalist: the run's datalist.
        dataset_dir: ``--dataset_dir`` as given (empty = demo data).
        package_requirement: her2-monai's requirement line for the model's environment (empty = this installation's).
        input_runs: names of other runs of the experiment that trained on the same datalist (the CM-GAN stage): they
            get the same datasets as inputs, so the UI's Dataset column shows them too.

    Returns:
        :func:`~her2_monai.serving.mlflow_model.log_bundle_model`'s result, or ``None`` when the store failed or
        the stage-2 run is not in it (a warning says why).
    """
    import mlflow

    from her2_monai.serving.mlflow_model import log_bundle_model, log_datalist_inputs, set_experiment_kind

    def log() -> dict[str, Any] | None:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        run = find_run(client, experiment.experiment_id, run_name) if experiment is not None else None
        if run is None:
            logger.warning("no MLflow run named '%s': the model is not logged to MLflow", run_name)
            return None
        set_experiment_kind(client, experiment.experiment_id)
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run.info.run_id):
            log_datalist_inputs(datalist, dataset_dir)
        for name in input_runs:
            other = find_run(client, experiment.experiment_id, name)
            if other is None:
                logger.warning("no MLflow run named '%s': its datasets are not logged", name)
                continue
            with mlflow.start_run(run_id=other.info.run_id):
                log_datalist_inputs(datalist, dataset_dir, splits=("training", "validation"))
        result = log_bundle_model(
            tracking_uri,
            run.info.run_id,
            model_file,
            inference_config,
            registered_model_name=registered_model_name,
            datalist=datalist,
            package_requirement=package_requirement,
        )
        logger.info("MLflow model %s%s", result["model_uri"], _registered(result))
        return result

    return _log_model_safely("model logging", log, tracking_uri)


def _registered(result: Mapping[str, Any]) -> str:
    if result.get("version") is None:
        return ""
    return f", registered as models:/{result['registered_model_name']}/{result['version']}"


def log_evaluation_model(
    tracking_uri: str,
    run_id: str | None,
    report: Mapping[str, Any],
    model_file: str | os.PathLike,
    inference_config: str | os.PathLike,
    registered_model_name: str | None,
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    package_requirement: str | None = None,
) -> dict[str, Any] | None:
    """After ``run evaluating``: log the test split (``mlflow.log_input``, context ``evaluation``) and the evaluated
    predictor into the evaluation run, and set the evaluation metrics as tags on the registered model version of
    that ``model.pt`` (the one stage 2 registered; a new version if there is none).

    Args:
        tracking_uri: the MLflow store.
        run_id: the evaluation run (:func:`log_evaluation_run`'s result; ``None`` = nothing to do).
        report: the evaluation report.
        model_file: the evaluated ``models/model.pt``.
        inference_config: the ``inference.json`` deployed with it.
        registered_model_name: Model Registry name (empty = not registered, no version tags).
        datalist: the evaluated datalist.
        dataset_dir: ``--dataset_dir`` as given.
        package_requirement: her2-monai's requirement line for the model's environment.

    Returns:
        :func:`~her2_monai.serving.mlflow_model.log_bundle_model`'s result, or ``None``.
    """
    if not run_id:
        return None
    import mlflow

    from her2_monai.serving.mlflow_model import log_bundle_model, log_datalist_inputs

    def log() -> dict[str, Any]:
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            log_datalist_inputs(datalist, dataset_dir, splits=("test",), context="evaluation")
        result = log_bundle_model(
            tracking_uri,
            run_id,
            model_file,
            inference_config,
            registered_model_name=registered_model_name,
            datalist=datalist,
            package_requirement=package_requirement,
            version_tags={**version_metric_tags(report), "eval.run_id": run_id},
            reuse_version=True,
        )
        logger.info("MLflow model %s%s (evaluation metrics tagged)", result["model_uri"], _registered(result))
        return result

    return _log_model_safely("model logging", log, tracking_uri)
