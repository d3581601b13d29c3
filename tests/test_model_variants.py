"""Every method of the comparison trains and evaluates through the bundle, selected by one override."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_bundle, tiny_overrides

from her2_monai.constants import SCENARIOS
from her2_monai.networks.factory import build_model

VARIANTS = {
    "simmlm": ({"model": "simmlm"}, "SimMLMNet"),
    "mora": ({"model": "mora"}, "MoRANet"),
    "specialists": ({"model": "specialists"}, "StainSpecialists"),
    "no_attention": ({"modality_attention": "false"}, "HER2FlexibleNet"),
    "no_disentangle": ({"dao_weight": 0.0, "dco_weight": 0.0}, "HER2FlexibleNet"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_and_evaluates_with_one_override(variant: str, trained_bundle: Path, tmp_path: Path) -> None:
    overrides, cls = VARIANTS[variant]
    (tmp_path / "models").mkdir()
    for weights in ("selector.pt", "cmgan.pt"):  # stages 0 and 1 are shared between variants
        shutil.copy2(trained_bundle / "models" / weights, tmp_path / "models" / weights)
    settings = tiny_overrides(tmp_path, trained_bundle / "cache", tracker="none", **overrides)
    workflow = run_bundle("train.json", "train_classifier", **settings)
    terms = set(workflow.parser.get_parsed_content("train#trainer").state.output)
    record = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["class"] == cls and record["metadata"]["model"] == overrides.get("model", "her2net")
    network = build_model(tmp_path / "models" / "model.pt")
    if variant == "no_attention":
        assert network.attention.channel is None and network.attention.spatial is None
    if variant == "no_disentangle":
        assert terms == {"loss", "ce", "dao", "dco"}
        assert workflow.parser.get_parsed_content("train#loss").disentangle.dao_weight == 0.0
    if variant == "simmlm":
        assert "mofe" in terms
    # Evaluation rebuilds whichever classifier the file holds; only where the data is must be said.
    data = {k: settings[k] for k in ("bundle_root", "demo_cache_dir", "demo_n_per_class", "demo_image_size")}
    run_bundle(["train.json", "evaluate.json"], "evaluating", tracker="none", **data)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["scenarios"]) == set(SCENARIOS)
    assert all(report["scenarios"][s]["n"] == 4 for s in SCENARIOS)
    assert report["translation"]["available"] is (cls == "HER2FlexibleNet")
