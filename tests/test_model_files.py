"""Model files carry their architecture: everything after training works with no architecture override at all.

The session's tiny bundle was trained with non-default architecture overrides (ResNet18 shared and specific
encoders, a CM-GAN of width 8 with one residual block, 32 px inputs). Predict, inference, evaluation and export
must rebuild exactly that network from ``models/model.pt`` alone and give the trained network's logits.

The comparisons with the hand-built network are about the architecture, so they pin float32 (:func:`pinned_fp32`):
on a CPU with bf16 hardware the bundle's default path runs bf16 autocast, which
:func:`test_the_default_arithmetic_stays_within_its_tolerance_of_fp32` checks on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS, TINY_TRAINING, bundle_component, pinned_fp32, probability_tolerance, run_bundle
from test_bundle_eval_infer import TINY_DATA, demo_dataset, deployed_bundle  # noqa: F401  (session fixture)

from her2_monai.cli import main
from her2_monai.inference import HER2Deploy, TorchScriptPredictor, load_predictor
from her2_monai.networks import BranchSelector, CrossModalGAN, HER2FlexibleNet
from her2_monai.networks.factory import build_model, check_overrides, read_weights
from her2_monai.networks.record import ArchitectureMismatchError

pytestmark = pytest.mark.arithmetic


@pytest.fixture(scope="module")
def trained_network(deployed_bundle: Path) -> HER2FlexibleNet:  # noqa: F811
    """The trained network, built by hand with the training overrides and loaded with plain PyTorch."""
    torch.manual_seed(0)
    train = json.loads((BUNDLE_CONFIGS / "train.json").read_text())
    net = HER2FlexibleNet(
        shared_backbone=TINY_TRAINING["shared_backbone"],
        specific_backbone=TINY_TRAINING["specific_backbone"],
        cmgan=CrossModalGAN(ngf=TINY_TRAINING["gan_ngf"], n_blocks=TINY_TRAINING["gan_n_blocks"]),
        selector=BranchSelector(
            channels=train["selector_cnn_channels"], stain_features=train["selector_stain_features"]
        ),
    )
    net.load_state_dict(torch.load(deployed_bundle / "models" / "model.pt", weights_only=True))
    return net.eval()


def _test_pair(bundle: Path) -> tuple[Path, Path]:
    data = demo_dataset(bundle)
    return data / "HE" / "test" / "00019_test_2+.png", data / "IHC" / "test" / "00019_test_2+.png"


def _expected_probabilities(
    net: HER2FlexibleNet, he: Path | None, ihc: Path | None, calibrated: bool = True
) -> list[float]:
    """The hand-built network's probabilities, with the temperature that training fitted and recorded (answers) or
    without it (``calibrated=False``: what evaluation collects, to report calibration before and after scaling)."""
    chain = bundle_component("train.json", "stain_preprocessing", image_size=TINY_TRAINING["image_size"])
    item = chain({"he": str(he) if he else None, "ihc": str(ihc) if ihc else None})
    temperature = float(net.metadata["calibration"]["temperature"]) if calibrated else 1.0
    assert temperature > 0
    with torch.no_grad():
        out = net(item["he"].as_tensor()[None], item["ihc"].as_tensor()[None], item["mask"][None])
    return (out["logits"] / temperature).softmax(dim=1)[0].tolist()


def test_predict_needs_no_architecture_override(capsys, monkeypatch, deployed_bundle: Path, trained_network) -> None:  # noqa: F811
    he, ihc = _test_pair(deployed_bundle)
    config = str(BUNDLE_CONFIGS / "inference.json")
    for args, stains in ((["--he", str(he), "--ihc", str(ihc)], (he, ihc)), (["--he", str(he)], (he, None))):
        with pinned_fp32(monkeypatch):
            code = main(["predict", *args, "--bundle", str(deployed_bundle), "--config_file", config])
        out = capsys.readouterr().out
        assert code == 0
        expected = _expected_probabilities(trained_network, *stains)
        assert json.loads(out)["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_inference_and_evaluation_need_no_architecture_override(
    monkeypatch,
    deployed_bundle: Path,  # noqa: F811
    trained_network,
    tmp_path,
):
    he, ihc = _test_pair(deployed_bundle)
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps([{"he": str(he), "ihc": str(ihc), "id": "case"}]))
    out = tmp_path / "predictions"
    with pinned_fp32(monkeypatch):
        run_bundle(
            "inference.json",
            "inferring",
            bundle_root=str(deployed_bundle),
            datalist=str(datalist),
            datalist_allow_outside_root=True,  # the images lie in the session's demo cache
            prediction_dir=str(out),
        )
    prediction = json.loads((out / "case.json").read_text())
    assert prediction["probabilities"] == pytest.approx(_expected_probabilities(trained_network, he, ihc), abs=1e-5)

    # Evaluation: only where the data is (the demo settings), nothing about the network.
    data = {"bundle_root": str(deployed_bundle), "demo_cache_dir": str(deployed_bundle / "cache"), **TINY_DATA}
    with pinned_fp32(monkeypatch):
        workflow = run_bundle(["train.json", "evaluate.json"], "evaluating", **data)
    collected = workflow.parser.get_parsed_content("evaluate#collector").probabilities["dual"]
    records = json.loads((deployed_bundle / "eval" / "datalist.json").read_text())["test"]
    expected = [_expected_probabilities(trained_network, Path(r["he"]), Path(r["ihc"]), False) for r in records]
    torch.testing.assert_close(torch.as_tensor(collected).float(), torch.tensor(expected), atol=1e-5, rtol=0)
    report = json.loads((deployed_bundle / "eval" / "metrics.json").read_text())
    assert report["image_size"] == TINY_TRAINING["image_size"] and report["profile"] == "demo"


def test_export_needs_no_architecture_override(monkeypatch, deployed_bundle: Path, trained_network, tmp_path) -> None:  # noqa: F811
    from monai.bundle import ckpt_export

    target = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(target),
        ckpt_file=str(deployed_bundle / "models" / "model.pt"),
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        config_file=str(BUNDLE_CONFIGS / "inference.json"),
        bundle_root=str(deployed_bundle),
    )
    scripted = torch.jit.load(str(target))
    x = torch.rand(2, 6, 32, 32) * 2 - 1
    temperature = float(trained_network.metadata["calibration"]["temperature"])
    assert scripted.temperature == pytest.approx(temperature) and scripted.calibrated
    with torch.no_grad():
        expected = trained_network(x[:, :3], x[:, 3:], torch.ones(2, 2))["logits"] / temperature
        torch.testing.assert_close(scripted(x), expected, atol=1e-4, rtol=1e-4)

    # predict --torchscript answers as the bundle does: dual, a declared single stain, and an unknown stain.
    he, ihc = _test_pair(deployed_bundle)
    with pinned_fp32(monkeypatch):  # the TorchScript predictor runs float32: compare it with the float32 path
        python = load_predictor(deployed_bundle, BUNDLE_CONFIGS / "inference.json")
    exported = TorchScriptPredictor(target)
    for inputs in ({"he": he, "ihc": ihc}, {"ihc": ihc}, {"image": he}):
        ours, theirs = python.predict(**inputs), exported.predict(**inputs)
        assert theirs["probabilities"] == pytest.approx(ours["probabilities"], abs=1e-4), inputs
        keys = ("score", "scenario", "detected_stains", "stain_source", "refer_threshold", "calibrated", "provenance")
        for key in keys:
            assert theirs[key] == ours[key], (key, inputs)
    assert main(["predict", "--torchscript", str(target), "--image", str(he)]) == 0
    with pytest.raises(ValueError, match="not a TorchScript"):
        TorchScriptPredictor(deployed_bundle / "models" / "model.pt")


def test_the_default_arithmetic_stays_within_its_tolerance_of_fp32(monkeypatch, deployed_bundle: Path) -> None:  # noqa: F811
    """The default path (bf16 autocast + channels-last where the CPU has bf16 hardware, or under
    ``HER2_CPU_PRECISION=bf16``) answers what the float32 path answers, within the arithmetic's tolerance."""
    he, ihc = _test_pair(deployed_bundle)
    config = BUNDLE_CONFIGS / "inference.json"
    default = load_predictor(deployed_bundle, config)
    with pinned_fp32(monkeypatch):
        reference = load_predictor(deployed_bundle, config)
    assert reference.amp is False
    tolerance = probability_tolerance(1e-5)
    for inputs in ({"he": he, "ihc": ihc}, {"he": he}, {"ihc": ihc}, {"image": he}):
        ours, theirs = default.predict(**inputs), reference.predict(**inputs)
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=tolerance), inputs
        for key in ("scenario", "detected_stains", "stain_source", "calibrated"):
            assert ours[key] == theirs[key], (key, inputs)
        margin = sorted(theirs["probabilities"])[-1] - sorted(theirs["probabilities"])[-2]
        if margin > 2 * tolerance:  # a clear call stays the same call
            assert ours["score"] == theirs["score"], inputs


def test_an_override_that_disagrees_with_the_model_file_is_a_clear_error(
    capsys,
    deployed_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    he, _ = _test_pair(deployed_bundle)
    config = str(BUNDLE_CONFIGS / "inference.json")
    code = main(["predict", "--he", str(he), "--bundle", str(deployed_bundle), "--config_file", config,
                 "--shared_backbone", "resnet50"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--shared_backbone resnet50 (the model was trained with resnet18)" in err and "Drop the override" in err
    with pytest.raises(ValueError, match="--image_size 64 .the model was trained with 32"):
        load_predictor(deployed_bundle, config, image_size=64)
    # An agreeing value is accepted.
    load_predictor(deployed_bundle, config, shared_backbone="resnet18", image_size=32)
    state = read_weights(deployed_bundle / "models" / "model.pt")
    with pytest.raises(ValueError, match="--gan_n_blocks 9 .the model was trained with 1"):
        check_overrides(state, {"gan_n_blocks": 9}, "model.pt")
    with pytest.raises(ValueError, match="unknown architecture option"):
        check_overrides(state, {"depth": 9}, "model.pt")


def test_foreign_or_damaged_model_files_get_clear_errors(deployed_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    good = torch.load(deployed_bundle / "models" / "model.pt", weights_only=True)
    # Another bundle's model.pt: a plain state dict without this bundle's record.
    foreign = tmp_path / "foreign.pt"
    torch.save({k: v for k, v in good.items() if not k.endswith("_extra_state")}, foreign)
    with pytest.raises(ArchitectureMismatchError, match="another bundle's file"):
        build_model(foreign)
    # A record that disagrees with the weights.
    edited = dict(good)
    edited["_extra_state"] = {**good["_extra_state"], "arguments": {**good["_extra_state"]["arguments"]}}
    edited["_extra_state"]["arguments"]["attention_channels"] = 16
    torch.save(edited, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="does not fit the network its record describes"):
        build_model(tmp_path / "edited.pt")
    # A truncated file and a missing one.
    data = (deployed_bundle / "models" / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        build_model(tmp_path / "truncated.pt")
    with pytest.raises(FileNotFoundError, match="run training"):
        build_model(tmp_path / "absent.pt")
    # The deploy module loads a model file into a network built with another architecture only with a clear error.
    other = HER2Deploy(
        HER2FlexibleNet(shared_backbone="resnet18", specific_backbone="resnet18", selector=BranchSelector())
    )
    with pytest.raises(ArchitectureMismatchError, match="specific_backbone='resnet10' in the file, 'resnet18' here"):
        other.load_state_dict(good)
