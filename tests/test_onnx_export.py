"""ONNX export (``export --format onnx``) and ONNX Runtime inference (``predict --runtime onnxruntime``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS, pinned_fp32
from test_bundle_eval_infer import demo_dataset, deployed_bundle  # noqa: F401  (helper, session fixture)

from her2_monai.cli import main
from her2_monai.inference import HER2Deploy, auto_batch_size, load_predictor

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra: pip install -e '.[onnx]'")

from her2_monai.inference.onnx_export import MANIFEST, ONNX_TOLERANCE, OnnxExportError  # noqa: E402
from her2_monai.inference.onnx_runtime import OnnxNetwork, load_onnx_predictor, read_manifest  # noqa: E402

INFERENCE = BUNDLE_CONFIGS / "inference.json"
META = BUNDLE_CONFIGS / "metadata.json"


def _config_args() -> list[str]:
    return ["--config_file", str(INFERENCE), "--meta_file", str(META)]


@pytest.fixture(scope="module")
def onnx_export(deployed_bundle: Path, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny trained bundle exported through the command line."""
    target = tmp_path_factory.mktemp("onnx") / "model_onnx"
    code = main(
        ["export", "--format", "onnx", "--bundle", str(deployed_bundle), "--output", str(target), *_config_args()]
    )
    assert code == 0
    return target


def test_export_writes_the_graphs_and_the_model_records(onnx_export: Path, deployed_bundle: Path) -> None:  # noqa: F811
    manifest = read_manifest(onnx_export)
    assert set(manifest["graphs"]) == {"selector", "he_to_ihc", "ihc_to_he", "classifier"}
    assert all((onnx_export / g["file"]).is_file() for g in manifest["graphs"].values())
    eager = HER2Deploy.from_model_file(deployed_bundle / "models" / "model.pt")
    # The records the TorchScript export carries, here in the manifest.
    assert manifest["temperature"] == pytest.approx(eager.temperature) and manifest["calibrated"]
    assert manifest["provenance"] == eager.provenance and manifest["provenance"]["source"] == "demo"
    assert manifest["stain_normalization"] == eager.net.metadata.get("stain_normalization")
    assert manifest["class_names"] == ["0", "1+", "2+", "3+"] and manifest["image_size"] == 32
    assert manifest["inference_config"] == json.loads(INFERENCE.read_text())
    diffs = manifest["check"]["max_abs_diff"]
    assert set(diffs) >= {"classifier", "selector", "deployed_dual", "deployed_single"}
    assert all(0 <= d <= ONNX_TOLERANCE for d in diffs.values())
    assert not [p.name for p in onnx_export.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_onnxruntime_gives_the_eager_fp32_logits(onnx_export: Path, deployed_bundle: Path, monkeypatch) -> None:  # noqa: F811
    with pinned_fp32(monkeypatch):
        eager = HER2Deploy.from_model_file(deployed_bundle / "models" / "model.pt", channels_last=False)
        runtime = HER2Deploy(OnnxNetwork(onnx_export)).eval()
        gen = torch.Generator().manual_seed(3)
        # Other batch sizes than the export's example (2) and its check (3): the batch is dynamic.
        for shape in ((1, 6, 32, 32), (5, 6, 32, 32), (1, 3, 32, 32), (4, 3, 32, 32)):
            x = torch.rand(shape, generator=gen) * 2 - 1
            with torch.no_grad():
                diff = (runtime(x) - eager(x)).abs().max().item()
            assert diff < ONNX_TOLERANCE, (shape, diff)
        with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
            runtime(torch.zeros(1, 6, 48, 48))


def _records(demo: Path) -> list[dict]:
    he = sorted((demo / "HE" / "test").iterdir())
    ihc = sorted((demo / "IHC" / "test").iterdir())
    return [
        {"id": "dual", "he": str(he[0]), "ihc": str(ihc[0])},
        {"id": "he", "he": str(he[1])},
        {"id": "ihc", "ihc": str(ihc[2])},
        {"id": "unknown", "image": str(ihc[3])},
        {"id": "unknown_he", "image": str(he[2])},
    ]


def test_predict_with_onnxruntime_gives_the_same_answers(onnx_export: Path, deployed_bundle: Path, monkeypatch) -> None:  # noqa: F811
    records = _records(demo_dataset(deployed_bundle))
    with pinned_fp32(monkeypatch):
        expected = load_predictor(deployed_bundle, INFERENCE, channels_last=False).predict_records(records)
        exported = load_onnx_predictor(onnx_export)
        found = exported.predict_records(records)
    assert exported.batch_size == auto_batch_size(exported.network.net.image_size)  # as the bundle's config
    for want, got in zip(expected, found):
        assert got["score"] == want["score"] and got["refer_reasons"] == want["refer_reasons"], want["id"]
        assert got["scenario"] == want["scenario"] and got["detected_stains"] == want["detected_stains"]
        assert got["stain_source"] == want["stain_source"] and got["provenance"] == want["provenance"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
        assert got["stain_confidence"] == pytest.approx(want["stain_confidence"], abs=1e-4)
        # The out-of-distribution score is the model's own (stain and texture statistics of the given images).
        assert got["ood_score"] == pytest.approx(want["ood_score"], rel=1e-4)
        assert got["refer_threshold"] == want["refer_threshold"] and got["calibrated"] == want["calibrated"]


def test_predict_command_runs_the_export(onnx_export: Path, deployed_bundle: Path, capsys, monkeypatch) -> None:  # noqa: F811
    record = _records(demo_dataset(deployed_bundle))[0]
    args = ["predict", "--he", record["he"], "--ihc", record["ihc"], "--bundle", str(deployed_bundle)]
    with pinned_fp32(monkeypatch):
        assert main([*args, "--config_file", str(INFERENCE)]) == 0
        torch_answer = json.loads(capsys.readouterr().out)
        assert main([*args, "--runtime", "onnxruntime", "--onnx", str(onnx_export)]) == 0
        onnx_answer = json.loads(capsys.readouterr().out)
    assert onnx_answer["score"] == torch_answer["score"]
    assert onnx_answer["probabilities"] == pytest.approx(torch_answer["probabilities"], abs=1e-4)
    assert main([*args, "--runtime", "tensorrt"]) == 2
    assert "--runtime must be torch, onnxruntime or openvino" in capsys.readouterr().err
    assert main([*args, "--onnx", str(onnx_export)]) == 2
    assert "add --runtime onnxruntime" in capsys.readouterr().err


def test_a_folder_that_is_not_an_export_is_a_clear_error(tmp_path: Path, deployed_bundle: Path, capsys) -> None:  # noqa: F811
    with pytest.raises(FileNotFoundError, match="export --format onnx"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"is not an ONNX export of this bundle.*{MANIFEST}"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    record = _records(demo_dataset(deployed_bundle))[1]
    code = main(["predict", "--he", record["he"], "--runtime", "onnxruntime", "--onnx", str(tmp_path)])
    assert code == 2 and f"'{tmp_path}' is not an ONNX export" in capsys.readouterr().err
    # Nor does an export overwrite a folder that holds something else.
    (tmp_path / "notes.txt").write_text("keep me")
    code = main(
        ["export", "--format", "onnx", "--bundle", str(deployed_bundle), "--output", str(tmp_path), *_config_args()]
    )
    assert code == 2 and "is not an ONNX export" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_incomplete_export_names_the_missing_graph(onnx_export: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text((onnx_export / MANIFEST).read_text())
    with pytest.raises(ValueError, match="the selector graph 'selector.onnx' is missing"):
        read_manifest(broken)


def test_missing_onnxruntime_is_a_clear_error(onnx_export: Path, deployed_bundle: Path, monkeypatch, capsys) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match=r"ONNX Runtime is not installed: pip install 'her2-monai\[onnx\]'"):
        OnnxNetwork(onnx_export)
    record = _records(demo_dataset(deployed_bundle))[1]
    assert main(["predict", "--he", record["he"], "--runtime", "onnxruntime", "--onnx", str(onnx_export)]) == 2
    assert "ONNX Runtime is not installed" in capsys.readouterr().err


def test_the_check_refuses_graphs_that_differ_from_the_eager_model(onnx_export: Path, deployed_bundle: Path) -> None:  # noqa: F811
    from her2_monai.inference.onnx_export import _check_against_eager

    deploy = HER2Deploy.from_model_file(deployed_bundle / "models" / "model.pt", channels_last=False)
    with torch.no_grad():
        deploy.net.head.fc.bias += 0.5  # the eager model no longer matches the exported classifier
    with pytest.raises(OnnxExportError, match=r"max abs diff classifier 0\.5.*> 0\.001; the export was not written"):
        _check_against_eager(deploy, onnx_export, 2, ONNX_TOLERANCE)


def test_a_failed_export_leaves_nothing_behind(deployed_bundle: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from her2_monai.inference import onnx_export as module

    def mismatch(*_, **__):
        raise OnnxExportError("the ONNX graphs do not reproduce the eager fp32 model")

    monkeypatch.setattr(module, "export_graphs", lambda *_, **__: {})
    monkeypatch.setattr(module, "_check_against_eager", mismatch)
    target = tmp_path / "out" / "onnx"
    with pytest.raises(OnnxExportError):
        module.export_onnx(deployed_bundle / "models" / "model.pt", target, INFERENCE, META)
    assert not target.exists() and list(target.parent.iterdir()) == []


#: OpenVINO runs in a process of its own in these tests, as it does behind predict/wsi: the test session imports many
#: native libraries, and with OpenVINO loaded into it 3 of 3 full runs crashed (SIGSEGV) later on (docs/deployment.md).
_OPENVINO_ANSWERS = """
import json, sys
from her2_monai.inference.onnx_runtime import load_onnx_predictor
predictor = load_onnx_predictor(sys.argv[1], runtime="openvino")
bf16 = sorted({graph.bf16 for graph in predictor.network.net.graphs.values()})
print(json.dumps({"bf16": bf16, "answers": predictor.predict_records(json.loads(sys.argv[2]))}))
"""


def _require_openvino_installed() -> None:
    # Looked up, not imported: OpenVINO is only ever loaded in the child processes.
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("the openvino extra: pip install -e '.[openvino]'")


def _in_own_process(args: list[str], fp32: bool) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with fp32 (``HER2_CPU_PRECISION=fp32``) or this CPU's default precision."""
    from her2_monai.runtime import PRECISION_ENV

    env = {k: v for k, v in os.environ.items() if k != PRECISION_ENV} | ({PRECISION_ENV: "fp32"} if fp32 else {})
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _openvino_answers(export: Path, records: list[dict], fp32: bool) -> dict:
    done = _in_own_process(["-c", _OPENVINO_ANSWERS, str(export), json.dumps(records)], fp32)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_openvino_gives_the_onnxruntime_answers(onnx_export: Path, deployed_bundle: Path, monkeypatch) -> None:  # noqa: F811
    _require_openvino_installed()
    from her2_monai.runtime import execution_settings

    records = _records(demo_dataset(deployed_bundle))
    with pinned_fp32(monkeypatch):  # OpenVINO in fp32: the same arithmetic as ONNX Runtime, to rounding
        expected = load_onnx_predictor(onnx_export).predict_records(records)
    found = _openvino_answers(onnx_export, records, fp32=True)
    assert found["bf16"] == [False]
    for want, got in zip(expected, found["answers"]):
        assert got["score"] == want["score"] and got["refer_reasons"] == want["refer_reasons"], want["id"]
        assert got["detected_stains"] == want["detected_stains"] and got["scenario"] == want["scenario"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
        assert got["ood_score"] == pytest.approx(want["ood_score"], rel=1e-4)
    # The default precision: bf16 exactly where the torch path takes bf16 (this CPU's hardware); valid answers.
    default = _openvino_answers(onnx_export, records, fp32=False)
    assert default["bf16"] == [execution_settings("cpu").amp]
    for want, got in zip(expected, default["answers"]):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=0.05), want["id"]
    with pytest.raises(ValueError, match="runtime must be one of"):
        OnnxNetwork(onnx_export, runtime="tensorrt")


def test_predict_and_wsi_commands_run_openvino(
    onnx_export: Path,
    deployed_bundle: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    _require_openvino_installed()
    import csv

    from conftest import SHARED_DATA

    record = _records(demo_dataset(deployed_bundle))[0]
    args = ["predict", "--he", record["he"], "--ihc", record["ihc"], "--bundle", str(deployed_bundle)]
    svs = SHARED_DATA / "wsi" / "cmu_small_region.svs"
    wsi = ["wsi", "--slide", str(svs), "--bundle", str(deployed_bundle), "--region", "256,512,1024,1024"]
    wsi += ["--tile_size", "256", "--batch_size", "4", "--progress", "false", "--min_tissue", "0.1"]
    with pinned_fp32(monkeypatch):
        assert main([*args, "--config_file", str(INFERENCE)]) == 0
        torch_answer = json.loads(capsys.readouterr().out)
        assert main([*wsi, "--output", str(tmp_path / "torch"), "--config_file", str(INFERENCE)]) == 0
    openvino = ["-m", "her2_monai", "--runtime", "openvino", "--onnx", str(onnx_export)]
    done = _in_own_process([*openvino[:2], *args, *openvino[2:]], fp32=True)
    openvino_answer = json.loads(done.stdout.strip().splitlines()[-1])
    _in_own_process([*openvino[:2], *wsi, "--output", str(tmp_path / "ov"), *openvino[2:]], fp32=True)
    assert openvino_answer["score"] == torch_answer["score"]
    assert openvino_answer["probabilities"] == pytest.approx(torch_answer["probabilities"], abs=1e-4)
    tiles = [list(csv.DictReader((tmp_path / name / "tiles.csv").open())) for name in ("torch", "ov")]
    assert len(tiles[0]) >= 4 and [r["score"] for r in tiles[1]] == [r["score"] for r in tiles[0]]
    summaries = [json.loads((tmp_path / name / "slide.json").read_text()) for name in ("torch", "ov")]
    for key in ("score", "tile_counts", "referred_tiles", "tissue_tiles"):
        assert summaries[1][key] == summaries[0][key], key
    capsys.readouterr()
    # What the export runtimes cannot do is refused in one line.
    assert main([*wsi, "--output", str(tmp_path / "x"), "--runtime", "openvino", "--compile", "true"]) == 2
    assert "drop --compile true" in capsys.readouterr().err
    assert main([*wsi, "--output", str(tmp_path / "x"), "--runtime", "openvino", "--config_file", str(INFERENCE)]) == 2
    assert "drop --config_file" in capsys.readouterr().err
    assert main([*wsi, "--output", str(tmp_path / "x"), "--onnx", str(onnx_export)]) == 2
    assert "add --runtime onnxruntime" in capsys.readouterr().err
    assert main([*args, "--runtime", "openvino", "--onnx", str(onnx_export), "--device", "cuda"]) == 2
    assert "--runtime openvino runs on the CPU" in capsys.readouterr().err
    assert "openvino" not in sys.modules  # refused before OpenVINO is loaded; it never enters the test session
