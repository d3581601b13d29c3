"""MONAI bundle tooling: verify_metadata (offline, vendored schema), verify_net_in_out and TorchScript export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS
from test_bundle_eval_infer import deployed_bundle  # noqa: F401  (session fixture)

from her2_monai.inference import HER2Deploy
from her2_monai.runtime import inductor_weight_prepack

#: Architecture options for an untrained deployment network (no model file): small, so the checks are quick.
TINY_ARCHITECTURE = {"shared_backbone": "resnet18", "specific_backbone": "resnet10", "gan_ngf": 4, "gan_n_blocks": 1}

META = BUNDLE_CONFIGS / "metadata.json"
SCHEMA = BUNDLE_CONFIGS / "schema" / "meta_schema_20240725.json"
INFERENCE = BUNDLE_CONFIGS / "inference.json"


def test_metadata_passes_monai_verify_metadata_with_the_vendored_schema(tmp_path: Path) -> None:
    pytest.importorskip("jsonschema", reason="MONAI's verify_metadata needs the jsonschema package")
    from monai.bundle import verify_metadata

    metadata = json.loads(META.read_text())
    assert metadata["schema"].endswith("/" + SCHEMA.name)  # the vendored file is the schema the metadata names
    from her2_monai import __version__

    assert metadata["version"] == __version__ and __version__ in metadata["changelog"]
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))  # the file exists, so nothing is downloaded
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 6 and image["value_range"] == [-1, 1]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 4 and pred["channel_def"] == {
        "0": "HER2 0",
        "1": "HER2 1+",
        "2": "HER2 2+",
        "3": "HER2 3+",
    }

    broken = {k: v for k, v in metadata.items() if k != "network_data_format"}
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("channels", [6, 3])
def test_network_def_passes_verify_net_in_out(channels: int, tmp_path: Path) -> None:
    from monai.bundle import verify_net_in_out

    # Random weights on purpose: the check is about the I/O contract, so it needs no trained files. The bundle root is
    # an empty folder: the repository's own bundle/models may hold a model the user trained with other settings.
    overrides = {
        **TINY_ARCHITECTURE,
        "bundle_root": str(tmp_path),
        "_meta_#network_data_format#inputs#image#num_channels": channels,
    }
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(INFERENCE), device="cpu", **overrides)


def test_ckpt_export_writes_torchscript_with_the_eager_logits(deployed_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    from monai.bundle import ckpt_export

    target = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(target),
        ckpt_file=str(deployed_bundle / "models" / "model.pt"),
        meta_file=str(META),
        config_file=str(INFERENCE),
        bundle_root=str(deployed_bundle),
    )
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(target), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == "0.2.0" and extra["inference.json"]
    assert json.loads(scripted.provenance)["source"] == "demo"  # what the model was trained on travels with it

    eager = HER2Deploy.from_model_file(deployed_bundle / "models" / "model.pt")
    gen = torch.Generator().manual_seed(1)
    # Other batch sizes and resolutions than the traces (batch 2, 32 px) were made with.
    for shape in ((3, 6, 48, 48), (1, 6, 32, 32), (3, 3, 48, 48), (2, 3, 64, 64)):
        x = torch.rand(shape, generator=gen) * 2 - 1
        with torch.no_grad():
            diff = (scripted(x) - eager(x)).abs().max().item()
        assert diff < 1e-4, (shape, diff)
    with pytest.raises(Exception, match="3 channels"):
        scripted(torch.zeros(1, 4, 32, 32))


def _predict_batches(deploy: HER2Deploy) -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    outputs = []
    for mask in ([1.0, 1.0], [1.0, 0.0], [0.0, 1.0]):  # dual, H&E only, IHC only: three traced graphs
        keep = torch.tensor(mask)
        he = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1) * keep[0]
        ihc = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1) * keep[1]
        outputs.append(deploy.predict_batch(he, ihc, keep.expand(2, 2).contiguous()))
    return outputs


@pytest.mark.slow
def test_compiled_classifier_answers_as_the_eager_one(deployed_bundle: Path) -> None:  # noqa: F811
    model = deployed_bundle / "models" / "model.pt"
    eager = HER2Deploy.from_model_file(model)
    compiled = HER2Deploy.from_model_file(model, compile_network="true")  # a string, as from the command line
    assert compiled.compile_network and not eager.compile_network
    for expected, found in zip(_predict_batches(eager), _predict_batches(compiled)):
        torch.testing.assert_close(found["pred"], expected["pred"], atol=1e-4, rtol=1e-4)
        assert torch.equal(found["scenario"], expected["scenario"])
    assert compiled.compile_network, "compilation failed and fell back to eager"
    # Frozen: oneDNN runs the convolutions prepacked, with their activations fused in. An unfrozen graph calls the plain
    # aten convolution (what torch.compile(options={"freezing": True}) silently gave, at half the speed-up). Where
    # ATen's kernels are AVX2, prepacking is left off on purpose (runtime.inductor_weight_prepack).
    with torch.profiler.profile() as profiler:
        _predict_batches(compiled)
    operators = {event.key for event in profiler.key_averages()}
    prepacked = "mkldnn::_convolution_pointwise" in operators
    assert prepacked is inductor_weight_prepack("cpu"), sorted(name for name in operators if "conv" in name)
    # The compiled callable is no submodule: the state dict (what model.pt and the export hold) is unchanged.
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.slow
def test_compiled_classifier_does_not_prepack_weights_on_avx2_kernels(deployed_bundle: Path, monkeypatch) -> None:  # noqa: F811
    # Prepacked weights with AVX2 kernels gave wrong logits on the paper's architecture (docs/performance.md); there
    # the graph is frozen without prepacking. (Which convolutions a graph gets cannot be read from a second compiled
    # model in one process: inductor registers its oneDNN fusion patterns once, at the first compilation.)
    from types import SimpleNamespace

    import torch._inductor.config as inductor_config

    from her2_monai import runtime
    from her2_monai.inference import deploy as deploy_module

    model = deployed_bundle / "models" / "model.pt"
    eager = HER2Deploy.from_model_file(model)
    compiled = HER2Deploy.from_model_file(model, compile_network=True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not runtime.inductor_weight_prepack("cpu") and runtime.inductor_weight_prepack("cuda")
    patches = []
    recording = SimpleNamespace(patch=lambda *args, **kw: patches.append(args) or inductor_config.patch(*args, **kw))
    monkeypatch.setattr(deploy_module, "_inductor_config", lambda: recording)
    for expected, found in zip(_predict_batches(eager), _predict_batches(compiled)):
        torch.testing.assert_close(found["pred"], expected["pred"], atol=1e-4, rtol=1e-4)
    assert compiled.compile_network, "the compiled answers were not trusted"
    assert patches and all(args == ({"freezing": True, "cpp.weight_prepack": False},) for args in patches), patches
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert runtime.inductor_weight_prepack("cpu")


def test_a_compiler_that_answers_wrong_falls_back_to_the_eager_network(deployed_bundle: Path, caplog) -> None:  # noqa: F811
    # Frozen torch.compile with AVX2 vector code gave logits 2 to 1e25 off on the paper's architecture
    # (docs/performance.md). The first compiled answer for each input signature is checked against the eager one.
    from her2_monai.inference.deploy import compiled_mismatch

    model = deployed_bundle / "models" / "model.pt"
    eager = HER2Deploy.from_model_file(model)
    deploy = HER2Deploy.from_model_file(model, compile_network=True)
    net = deploy.inference_network()
    calls = []

    def wrong(he, ihc, mask):  # a "compiled" network that runs but adds 0.5 to every logit
        calls.append(he.shape)
        out = dict(net(he, ihc, mask))
        out["logits"] = out["logits"] + 0.5
        return out

    deploy._compiled = wrong
    with caplog.at_level("WARNING", logger="her2_monai.inference.deploy"):
        found = _predict_batches(deploy)
    assert "torch.compile gave wrong answers (logits up to 0.5" in caplog.text
    assert not deploy.compile_network and len(calls) == 1  # never called again once caught
    for expected, got in zip(_predict_batches(eager), found):
        torch.testing.assert_close(got["pred"], expected["pred"])
    # The tolerance: float32 graphs agree to 1e-5, bf16 ones to about 0.06; a miscompilation is far outside either.
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    assert compiled_mismatch(logits + 1e-5, logits, low_precision=False) is None
    assert compiled_mismatch(logits + 0.01, logits, low_precision=False) is not None
    assert compiled_mismatch(logits + 0.1, logits, low_precision=True) is None
    assert compiled_mismatch(logits + 1.0, logits, low_precision=True) is not None
    assert compiled_mismatch(logits * float("nan"), logits, low_precision=True) is not None
    # A correct compiled network is checked once per input signature, then trusted.
    right = HER2Deploy.from_model_file(model, compile_network=True)
    checked_net = right.inference_network()
    right._compiled = lambda he, ihc, mask: calls.append(he.shape) or checked_net(he, ihc, mask)
    _predict_batches(right)
    _predict_batches(right)
    assert right.compile_network and len(right._checked_inputs) == 3 and len(calls) == 1 + 6  # 3 stain patterns


def test_a_failing_compiler_falls_back_to_the_eager_network(deployed_bundle: Path, monkeypatch, caplog) -> None:  # noqa: F811
    model = deployed_bundle / "models" / "model.pt"
    eager = HER2Deploy.from_model_file(model)
    deploy = HER2Deploy.from_model_file(model, compile_network=True)

    def broken(*_, **__):
        raise RuntimeError("no C++ compiler found")

    deploy.inference_network()  # build the inference copy first: building it drops any compiled callable
    monkeypatch.setattr(deploy, "_compiled", broken)
    with caplog.at_level("WARNING", logger="her2_monai.inference.deploy"):
        found = _predict_batches(deploy)
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in caplog.text
    assert not deploy.compile_network  # later batches go straight to the eager network
    for expected, got in zip(_predict_batches(eager), found):
        torch.testing.assert_close(got["pred"], expected["pred"])
    with pytest.raises(ValueError, match="compile"):
        HER2Deploy.from_model_file(model, compile_network="sometimes")


def test_inference_config_turns_compilation_on_by_one_key(deployed_bundle: Path) -> None:  # noqa: F811
    from her2_monai.inference import load_predictor

    assert not load_predictor(deployed_bundle, INFERENCE).network.compile_network  # off by default
    # --compile true on the command line reaches the config as the string "true".
    assert load_predictor(deployed_bundle, INFERENCE, compile="true").network.compile_network


def test_inference_batch_size_follows_the_model_input_side(deployed_bundle: Path) -> None:  # noqa: F811
    # The config's default batch size comes from the model's recorded input side (auto_batch_size); a number given
    # on the command line replaces it.
    from her2_monai.inference import auto_batch_size, load_predictor
    from her2_monai.networks.factory import model_image_size

    side = model_image_size(str(deployed_bundle / "models" / "model.pt"), None)
    predictor = load_predictor(deployed_bundle, INFERENCE)
    assert side <= 128 and predictor.batch_size == auto_batch_size(side) == 16  # was a fixed 8
    assert load_predictor(deployed_bundle, INFERENCE, batch_size=3).batch_size == 3
