"""The deployed predictor as an MLflow pyfunc model: logged by stage 2 and ``run evaluating``, served by MLflow.

:class:`HER2PyfuncModel` wraps :func:`her2_monai.inference.load_predictor`; its artifacts are the bundle's deployed
files, ``model.pt`` (with ``model.pt.sha256``, checked on load) and ``inference.json``. Input: a pandas DataFrame with
the columns ``he``, ``ihc`` and ``image`` (all optional strings), one row per case, each value either

* a path of an image file readable where the model runs, or
* the file's bytes in base64 (PNG, JPEG or TIFF; a ``data:image/...;base64,`` prefix is accepted): what a REST
  client sends, as the server cannot read the client's files.

Give ``he`` and/or ``ihc`` for a case whose stains are known, or ``image`` alone for one image of unknown stain.
Output: one dict per row, the JSON answer of :meth:`~her2_monai.inference.predictor.HER2Predictor.predict`
(``score``, ``probabilities``, ``confidence``, ``refer``, ``refer_reasons``, ``provenance``, ``warnings``, ...);
``mlflow models serve`` returns them as ``{"predictions": [...]}``.

:func:`log_bundle_model` logs that model into a run with a signature, an input example (one dual case of the datalist,
base64), the calibration and the provenance in its metadata and pinned ``pip_requirements``, registers it under a name
of the Model Registry, and :func:`log_datalist_inputs` logs the datalist as the run's datasets
(``mlflow.log_input``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

__all__ = [
    "INPUT_COLUMNS",
    "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_KIND",
    "MODEL_SHA256_TAG",
    "HER2PyfuncModel",
    "model_requirements",
    "model_signature",
    "set_experiment_kind",
    "log_datalist_inputs",
    "log_bundle_model",
    "find_model_version",
    "tag_model_version",
]

logger = logging.getLogger(__name__)

#: Columns of the pyfunc input, one row per case.
INPUT_COLUMNS = ("he", "ihc", "image")
#: The experiment tag MLflow 3's UI reads to choose the experiment's home page, and the value for model training
#: (without it the UI opens an experiment on the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Tag of a registered model version (and of the logging run): the SHA-256 of its ``model.pt``.
MODEL_SHA256_TAG = "her2_monai.model_sha256"
#: Name of the model inside its run (``runs:/<run_id>/her2_predictor``).
MODEL_NAME = "her2_predictor"
#: Largest image accepted in base64, decoded (the predictor's own pixel limits apply after that).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
_MAGIC = {b"\x89PNG\r\n\x1a\n": ".png", b"\xff\xd8\xff": ".jpg", b"II*\x00": ".tif", b"MM\x00*": ".tif"}
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


def _image_file(value: Any, folder: Path, stem: str) -> str | None:
    """A path the predictor can read for one input cell (``None`` for an empty cell).

    Raises:
        ValueError: if the value is neither an existing file nor base64 image bytes.
    """
    if _missing(value):
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{stem}': expected a file path or base64 image bytes, got {type(value).__name__}")
    if len(value) < 4096 and Path(value).is_file():
        return value
    text = _DATA_URL.sub("", value.strip(), count=1)
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ValueError(f"'{stem}': image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"'{stem}': not a file on this machine nor base64-encoded image bytes") from None
    suffix = next((ext for magic, ext in _MAGIC.items() if data.startswith(magic)), None)
    if suffix is None:
        raise ValueError(f"'{stem}': the base64 bytes are not a PNG, JPEG or TIFF image")
    path = folder / f"{stem}{suffix}"
    path.write_bytes(data)
    return str(path)


class HER2PyfuncModel(PythonModel):
    """MLflow pyfunc wrapper of the bundle's predictor (see the module docstring for the input and output).

    Artifacts (names in ``context.artifacts``): ``model`` (``model.pt``), ``model_sha256`` (its ``.sha256``, beside
    it) and ``inference_config`` (``inference.json``).
    """

    def load_context(self, context: Any) -> None:
        """Build the predictor from the artifacts (the model file is checked against its SHA-256 first)."""
        from her2_monai.inference import load_predictor

        model = Path(context.artifacts["model"])
        self._predictor = load_predictor(
            model.parent, context.artifacts["inference_config"], models_dir=str(model.parent)
        )

    # ``model_input`` carries no type hint: MLflow would read one as a schema (and warns about a DataFrame hint).
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Score every row of ``model_input`` (a DataFrame, or anything ``pandas.DataFrame`` accepts).

        Args:
            context: MLflow's model context (unused; the predictor was built in :meth:`load_context`).
            model_input: rows with the columns ``he``, ``ihc``, ``image`` (missing columns = empty).
            params: unused.

        Returns:
            One answer dict per row, in row order.

        Raises:
            ValueError: for a row whose values are not image files or base64 image bytes, or whose columns the
                predictor refuses (no image, or ``image`` with ``he``/``ihc``).
        """
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        unknown = sorted(set(map(str, frame.columns)) - set(INPUT_COLUMNS))
        if unknown:
            raise ValueError(f"unknown input columns {unknown}; expected some of {list(INPUT_COLUMNS)}")
        answers = []
        with tempfile.TemporaryDirectory(prefix="her2_pyfunc_") as tmp:  # private (mode 0700), removed afterwards
            folder = Path(tmp)
            for row, (_, case) in enumerate(frame.iterrows()):
                inputs = {c: _image_file(case.get(c), folder, f"row{row}_{c}") for c in INPUT_COLUMNS}
                answers.append(self._predictor.predict(**inputs))
        return answers


def _installed_requirement(requirement: str) -> str | None:
    """``name==installed version`` for a ``Requires-Dist`` line of the default install (``None`` for an extra)."""
    if "extra ==" in requirement.replace('"', "").replace("'", ""):
        return None
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement.split(";")[0].strip()


def _package_requirement() -> str:
    """How an environment gets her2-monai itself: the repository it was installed from, else the version."""
    try:
        dist = importlib.metadata.distribution("her2-monai")
    except importlib.metadata.PackageNotFoundError:
        return "her2-monai"
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        if url:
            return f"her2-monai @ {url}"
    return f"her2-monai=={dist.version}"


def model_requirements(package: str | None = None) -> list[str]:
    """The model's ``pip_requirements``: her2-monai's dependencies pinned to what is installed, and her2-monai.

    Args:
        package: the requirement line of her2-monai itself (e.g. ``her2-monai @ git+https://...@<commit>``);
            ``None`` or empty = where this installation came from (``her2-monai @ file:///<repository>`` for
            ``pip install -e .``; another machine needs a line that reaches the code from there).

    Returns:
        Requirement lines, her2-monai first.
    """
    try:
        requires = importlib.metadata.requires("her2-monai") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    pinned = [line for line in (_installed_requirement(r) for r in requires) if line]
    return [package or _package_requirement(), *sorted(set(pinned), key=str.lower)]


def model_signature() -> Any:
    """The pyfunc signature: three optional string columns in, one answer per row out (not enforced by MLflow)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string, c, required=False) for c in INPUT_COLUMNS]))


def set_experiment_kind(client: Any, experiment_id: str) -> None:
    """Tag an experiment as model training, so MLflow's UI opens it on its runs (not the GenAI overview)."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _without_state(value: Any) -> Any:
    """A calibration record without its OOD model state (arrays: in ``model.pt``, not in the MLmodel file)."""
    if isinstance(value, Mapping):
        return {str(k): _without_state(v) for k, v in value.items() if k != "state"}
    if isinstance(value, (list, tuple)):
        return [_without_state(v) for v in value]
    return value


def _model_metadata(model_file: Path) -> dict[str, Any]:
    """Calibration and provenance of a model file, and its digest, for the MLmodel ``metadata``."""
    from her2_monai.calibration.record import CALIBRATION_KEY
    from her2_monai.data.provenance import TRAINING_DATA_KEY, model_provenance
    from her2_monai.networks.factory import network_record, read_weights
    from her2_monai.networks.record import plain

    record = network_record(read_weights(model_file, "trained HER2 classifier")) or {}
    metadata = record.get("metadata") or {}
    return plain(
        {
            "model_sha256": _sha256(model_file),
            "architecture": record.get("class"),
            "image_size": metadata.get("image_size"),
            "calibration": _without_state(metadata.get(CALIBRATION_KEY)),
            "provenance": model_provenance(metadata),
            "training_data": metadata.get(TRAINING_DATA_KEY),
            "input": "DataFrame columns he, ihc, image: image file paths or base64-encoded PNG/JPEG/TIFF bytes",
        }
    )


def _datalist_frame(datalist: str | os.PathLike, splits: Sequence[str]) -> pd.DataFrame:
    from her2_monai.constants import CLASS_NAMES

    content = json.loads(Path(datalist).read_text())
    rows = []
    for split in splits:
        for record in content.get(split) or []:
            label = record.get("label")
            he, ihc = bool(record.get("he")), bool(record.get("ihc"))
            rows.append(
                {
                    "split": split,
                    "he": str(record.get("he") or ""),
                    "ihc": str(record.get("ihc") or ""),
                    "label": CLASS_NAMES[label] if isinstance(label, int) and 0 <= label < len(CLASS_NAMES) else "",
                    "scenario": "dual" if he and ihc else "he_only" if he else "ihc_only" if ihc else "",
                }
            )
    return pd.DataFrame(rows, columns=["split", "he", "ihc", "label", "scenario"])


def _flat(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: str(value)}


def log_datalist_inputs(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = ("training", "validation", "test"),
    context: str | None = None,
) -> list[Any]:
    """Log the datalist as the active run's datasets (``mlflow.log_input``), one per split.

    Each dataset is a DataFrame of the split's records (``split``, ``he``, ``ihc``, ``label``, ``scenario``) from
    ``mlflow.data.from_pandas`` with the datalist as its source; its input tags hold the datalist's SHA-256 and the
    split's counts per class and scenario (:func:`~her2_monai.data.provenance.training_data`).

    Args:
        datalist: the datalist JSON the run used.
        dataset_dir: the dataset folder as given (empty = the built-in demo data).
        splits: which splits to log.
        context: the input context (default: the split name).

    Returns:
        The logged datasets.
    """
    from her2_monai.data.provenance import training_data

    record = training_data(datalist, dataset_dir)
    digest = record.get("datalist_sha256") or ""
    frame = _datalist_frame(datalist, splits)
    logged = []
    for split in splits:
        with warnings.catch_warnings():  # a local path matches MLflow's "" and "file" artifact sources alike
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(
                frame[frame["split"] == split].reset_index(drop=True),
                source=str(Path(datalist).resolve()),
                name=f"{record['source']}-{split}-{digest[:12]}",
            )
        tags = {
            "datalist_sha256": digest,
            "source": str(record["source"]),
            "dataset_dir": str(record["dataset_dir"]),
            **_flat("", (record.get("splits") or {}).get(split, {})),
        }
        mlflow.log_input(dataset, context=context or split, tags=tags)
        logged.append(dataset)
    return logged


def _input_example(datalist: str | os.PathLike | None) -> pd.DataFrame | None:
    """One dual case of the datalist (test split first), as base64 file bytes; ``None`` if there is none."""
    if not datalist or not Path(datalist).is_file():
        return None
    content = json.loads(Path(datalist).read_text())
    for split in ("test", "validation", "training"):
        for record in content.get(split) or []:
            he, ihc = record.get("he"), record.get("ihc")
            if he and ihc and Path(he).is_file() and Path(ihc).is_file():
                return pd.DataFrame(
                    [
                        {
                            "he": base64.b64encode(Path(he).read_bytes()).decode("ascii"),
                            "ihc": base64.b64encode(Path(ihc).read_bytes()).decode("ascii"),
                            "image": None,
                        }
                    ],
                    columns=list(INPUT_COLUMNS),
                )
    return None


def find_model_version(client: Any, name: str, model_sha256: str) -> Any | None:
    """The latest version of a registered model whose ``model.pt`` has that digest (``None`` if none)."""
    versions = client.search_model_versions(f"name = '{name}'")
    matching = [v for v in versions if (v.tags or {}).get(MODEL_SHA256_TAG) == model_sha256]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def tag_model_version(client: Any, name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a model version (values as strings)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), str(key), str(value))


def log_bundle_model(
    tracking_uri: str,
    run_id: str,
    model_file: str | os.PathLike,
    inference_config: str | os.PathLike,
    registered_model_name: str | None = None,
    datalist: str | os.PathLike | None = None,
    package_requirement: str | None = None,
    version_tags: Mapping[str, Any] | None = None,
    reuse_version: bool = False,
) -> dict[str, Any]:
    """Log the deployed predictor into a run as a pyfunc model and register it.

    Args:
        tracking_uri: the MLflow store.
        run_id: the run that gets the model (re-opened if it has ended).
        model_file: ``models/model.pt`` (its ``.sha256`` must lie beside it).
        inference_config: ``configs/inference.json``.
        registered_model_name: Model Registry name; empty or ``None`` = not registered.
        datalist: the run's datalist (an input example is taken from it; none without one).
        package_requirement: her2-monai's requirement line (see :func:`model_requirements`).
        version_tags: tags set on the registered version (e.g. evaluation metrics).
        reuse_version: tag the existing version with the same ``model.pt`` digest instead of registering another
            (``run evaluating`` of a model stage 2 registered); a new version is registered when there is none.

    Returns:
        ``{"model_uri", "model_sha256", "registered_model_name", "version"}`` (name and version ``None`` when not
        registered).

    Raises:
        FileNotFoundError: if the model file, its checksum file or the config is missing.
    """
    model_file, inference_config = Path(model_file), Path(inference_config)
    checksum = model_file.with_name(model_file.name + ".sha256")
    for path in (model_file, checksum, inference_config):
        if not path.is_file():
            raise FileNotFoundError(f"'{path}' not found: the MLflow model needs the trained, calibrated model file")
    metadata = _model_metadata(model_file)
    digest = metadata["model_sha256"]
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    result: dict[str, Any] = {"model_sha256": digest, "registered_model_name": None, "version": None}
    existing = None
    if registered_model_name and reuse_version:
        try:
            existing = find_model_version(client, registered_model_name, digest)
        except mlflow.exceptions.MlflowException:
            existing = None
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow asks for type hints on predict(); a DataFrame hint is refused too, and the signature says it all.
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
        mlflow.set_tag(MODEL_SHA256_TAG, digest)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(__file__).with_name("pyfunc_code.py")),  # models from code: nothing pickled
            artifacts={
                "model": str(model_file),
                "model_sha256": str(checksum),
                "inference_config": str(inference_config),
            },
            signature=model_signature(),
            input_example=_input_example(datalist),
            pip_requirements=model_requirements(package_requirement),
            metadata=metadata,
            registered_model_name=None if existing is not None else (registered_model_name or None),
        )
    result["model_uri"] = info.model_uri
    if registered_model_name:
        version = existing.version if existing is not None else info.registered_model_version
        if version is None:
            found = find_model_version(client, registered_model_name, digest)
            version = found.version if found is not None else None
        if version is not None:
            client.set_model_version_tag(registered_model_name, str(version), MODEL_SHA256_TAG, digest)
            tag_model_version(client, registered_model_name, str(version), version_tags or {})
        result.update(registered_model_name=registered_model_name, version=version)
    return result
