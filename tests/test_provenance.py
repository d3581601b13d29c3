"""What a model was trained on: the ``training_data`` record of ``model.pt`` and what every answer says about it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_CONFIGS
from PIL import Image
from test_bundle_eval_infer import demo_dataset

from her2_monai.constants import CLASS_NAMES
from her2_monai.data.provenance import (
    DEMO_WARNING,
    TRAINING_DATA_KEY,
    UNKNOWN_WARNING,
    model_provenance,
    provenance_tags,
    provenance_warnings,
    training_data,
)
from her2_monai.fileio import atomic_torch_save, verify_checksum
from her2_monai.inference import load_predictor, prediction_result

RECORDS = {
    "training": [
        {"he": "a_he.png", "ihc": "a_ihc.png", "label": 0},
        {"he": "b_he.png", "ihc": "b_ihc.png", "label": 3},
        {"he": "c_he.png", "ihc": None, "label": 1},
    ],
    "validation": [{"he": None, "ihc": "d_ihc.png", "label": 2}, {"he": "e_he.png", "ihc": "e_ihc.png", "label": None}],
    "test": [],
}
BCI_RECORD = {"version": 1, "source": "dataset", "dataset_dir": "/data/BCI/", "datalist_sha256": "ab" * 32}


def _datalist(folder: Path) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_training_data_counts_the_datalist_and_hashes_its_bytes(tmp_path: Path) -> None:
    path = _datalist(tmp_path)
    record = training_data(path, "/data/BCI")
    assert record["source"] == "dataset" and record["dataset_dir"] == "/data/BCI"
    assert record["datalist_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["splits"]["training"] == {
        "records": 3,
        "classes": {"0": 1, "1+": 1, "2+": 0, "3+": 1, "unlabelled": 0},
        "stains": {"dual": 2, "he_only": 1, "ihc_only": 0},
    }
    assert record["splits"]["validation"] == {
        "records": 2,
        "classes": {"0": 0, "1+": 0, "2+": 1, "3+": 0, "unlabelled": 1},
        "stains": {"dual": 1, "he_only": 0, "ihc_only": 1},
    }
    assert record["splits"]["test"]["records"] == 0
    assert len(json.dumps(record)) < 1000  # counts only: it travels in every model file
    # The demo (no dataset folder), another datalist (another hash), and a datalist not written yet.
    assert training_data(path, "")["source"] == training_data(path)["source"] == "demo"
    path.write_text(json.dumps({**RECORDS, "test": RECORDS["validation"]}))
    assert training_data(path)["datalist_sha256"] != record["datalist_sha256"]
    missing = training_data(tmp_path / "absent.json")
    assert missing["datalist_sha256"] is None and missing["splits"] == {}


def test_answers_summarise_the_record_and_warn_for_demo_and_unknown_data() -> None:
    bci = model_provenance({TRAINING_DATA_KEY: BCI_RECORD, "image_size": 512})
    assert bci == {"source": "dataset", "dataset": "BCI", "datalist_sha256": "ab" * 6}
    assert provenance_warnings(bci) == []
    demo = model_provenance({TRAINING_DATA_KEY: {**BCI_RECORD, "source": "demo", "dataset_dir": ""}})
    assert demo["source"] == demo["dataset"] == "demo" and provenance_warnings(demo) == [DEMO_WARNING]
    # A model file of an older version (no record), or a record this version cannot read: unknown, said so.
    for metadata in (None, {}, {TRAINING_DATA_KEY: "demo"}, {TRAINING_DATA_KEY: {"source": "elsewhere"}}):
        unknown = model_provenance(metadata)
        assert unknown["source"] == "unknown" and provenance_warnings(unknown) == [UNKNOWN_WARNING], metadata
    tags = provenance_tags({TRAINING_DATA_KEY: {**BCI_RECORD, "splits": {"training": {"records": 7}}}})
    assert tags["her2_monai.training_data.datalist_sha256"] == "ab" * 32  # the full digest
    assert tags["her2_monai.training_data.records"] == "training 7" and "her2_monai.warning" not in tags
    assert provenance_tags(None)["her2_monai.warning"] == UNKNOWN_WARNING


def test_prediction_result_warns_on_every_answer_of_a_demo_model_refusals_too() -> None:
    item = {"pred": torch.tensor([0.1, 0.6, 0.2, 0.1]), "scenario": torch.tensor(0), "detected_stains": [0, 1]}
    refused = {**item, "tissue_ok": torch.tensor(0.0), "tissue_issue": "blank image"}
    demo = {"source": "demo", "dataset": "demo", "datalist_sha256": "0123456789ab"}
    for case in (item, refused):
        answer = prediction_result(case, provenance=demo)
        assert answer["provenance"] == demo and answer["warnings"][-1] == DEMO_WARNING
    assert prediction_result(refused, provenance=demo)["warnings"] == ["blank image", DEMO_WARNING]
    assert prediction_result(refused, provenance=demo)["score"] is None
    bci = model_provenance({TRAINING_DATA_KEY: BCI_RECORD})
    assert prediction_result(item, provenance=bci)["warnings"] == []
    assert "provenance" not in prediction_result(item)  # a caller that does not know the model


# ------------------------------------------------------------------------------------- the tiny trained demo bundle
def _with_record(source: Path, target: Path, record: dict | None) -> Path:
    """A bundle folder with a copy of ``source``'s model whose training-data record is ``record`` (``None``: none, as
    in a file of an older version), saved with its checksum as the bundle saves it."""
    state = torch.load(source / "models" / "model.pt", weights_only=True)
    extra = dict(state["_extra_state"])
    metadata = {k: v for k, v in extra["metadata"].items() if k != TRAINING_DATA_KEY}
    if record is not None:
        metadata[TRAINING_DATA_KEY] = record
    state["_extra_state"] = {**extra, "metadata": metadata}
    atomic_torch_save(state, target / "models" / "model.pt", checksum=True)
    assert verify_checksum(target / "models" / "model.pt")
    return target


def _pair(bundle: Path) -> dict[str, Path]:
    data = demo_dataset(bundle)
    return {"he": data / "HE" / "test" / "00019_test_2+.png", "ihc": data / "IHC" / "test" / "00019_test_2+.png"}


def test_model_file_records_the_datalist_the_run_trained_from(trained_bundle: Path) -> None:
    metadata = torch.load(trained_bundle / "models" / "model.pt", weights_only=True)["_extra_state"]["metadata"]
    record = metadata[TRAINING_DATA_KEY]
    datalist = trained_bundle / "eval" / "datalist.json"
    splits = json.loads(datalist.read_text())
    assert record["source"] == "demo" and record["dataset_dir"] == ""
    assert record["datalist_sha256"] == hashlib.sha256(datalist.read_bytes()).hexdigest()
    assert {s: c["records"] for s, c in record["splits"].items()} == {s: len(r) for s, r in splits.items()}
    labels = [r["label"] for r in splits["training"]]
    assert [record["splits"]["training"]["classes"][c] for c in CLASS_NAMES] == [labels.count(i) for i in range(4)]
    # The image size and the stain normalisation keep their one place in the record.
    assert metadata["image_size"] == 32 and "stain_normalization" in metadata and "image_size" not in record

    # The stage-2 MLflow run is tagged with the same facts.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained_bundle / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("her2-monai")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'her2-demo-stage2-classifier'")
    tags = runs[0].data.tags
    assert tags["her2_monai.training_data.source"] == "demo"
    assert tags["her2_monai.training_data.datalist_sha256"] == record["datalist_sha256"]
    assert tags["her2_monai.warning"] == DEMO_WARNING


def test_a_demo_model_warns_on_every_answer_and_a_dataset_model_does_not(trained_bundle: Path, tmp_path: Path) -> None:
    config = BUNDLE_CONFIGS / "inference.json"
    pair = _pair(trained_bundle)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(blank)
    predictor = load_predictor(trained_bundle, config)
    digest = hashlib.sha256((trained_bundle / "eval" / "datalist.json").read_bytes()).hexdigest()
    answer = predictor.predict(**pair)
    assert answer["score"] in CLASS_NAMES and answer["warnings"][-1] == DEMO_WARNING
    assert answer["provenance"] == {"source": "demo", "dataset": "demo", "datalist_sha256": digest[:12]}
    refusal = predictor.predict(he=blank)
    assert refusal["score"] is None and refusal["refer_reasons"][0] == "no_tissue"
    assert refusal["warnings"][-1] == DEMO_WARNING and refusal["provenance"] == answer["provenance"]

    # The same weights with a record that says they were trained on a dataset folder: no demo warning.
    bci = load_predictor(_with_record(trained_bundle, tmp_path / "bci", BCI_RECORD), config).predict(**pair)
    assert bci["provenance"] == {"source": "dataset", "dataset": "BCI", "datalist_sha256": "ab" * 6}
    assert DEMO_WARNING not in bci["warnings"] and UNKNOWN_WARNING not in bci["warnings"]
    assert bci["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-6)  # only the record differs
    # A model file without the record (an older version) still loads and answers, and says so.
    old = load_predictor(_with_record(trained_bundle, tmp_path / "old", None), config).predict(**pair)
    assert old["score"] == answer["score"] and old["provenance"]["source"] == "unknown"
    assert old["warnings"][-1] == UNKNOWN_WARNING


def test_report_and_label_app_show_the_provenance(trained_bundle: Path, tmp_path: Path) -> None:
    from her2_monai.label_app.model import ModelHolder
    from her2_monai.networks.factory import build_model
    from her2_monai.report import EvaluationReport, write_html_report

    network = build_model(trained_bundle / "models" / "model.pt")
    section = EvaluationReport(tmp_path, collector=None, network=network).provenance()
    assert section["source"] == "demo" and section["warnings"] == [DEMO_WARNING]
    assert section["training_data"] == network.metadata[TRAINING_DATA_KEY]
    page = write_html_report(tmp_path / "report.html", {"provenance": section}, {}).read_text()
    assert DEMO_WARNING in page and "<h2>Training data</h2>" in page
    assert section["training_data"]["datalist_sha256"] in page
    bci = {**model_provenance({TRAINING_DATA_KEY: BCI_RECORD}), "warnings": [], "training_data": BCI_RECORD}
    page = write_html_report(tmp_path / "bci.html", {"provenance": bci}, {}).read_text()
    assert "class='warning'" not in page and "/data/BCI/" in page

    # The MONAI Label app's info: read from the model file, without loading the predictor; none before training.
    holder = ModelHolder(trained_bundle, loader=lambda *a, **k: pytest.fail("info must not load the predictor"))
    assert holder.provenance() == model_provenance(network.metadata)
    assert ModelHolder(tmp_path).provenance() is None
