"""``python -m her2_monai predict``: one JSON object on success, exit status 2 and one line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUNDLE_CONFIGS
from test_bundle_eval_infer import (  # noqa: F401  (session fixture)
    demo_dataset,
    deployed_bundle,
    with_forced_selector,
)

from her2_monai.cli import main
from her2_monai.constants import CLASS_NAMES

KEYS = {"score", "probabilities", "confidence", "refer", "scenario", "detected_stains"}


def _predict(capsys, bundle: Path, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args, "--bundle", str(bundle), "--config_file", str(BUNDLE_CONFIGS / "inference.json")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pair(deployed_bundle: Path) -> tuple[Path, Path]:  # noqa: F811
    data = demo_dataset(deployed_bundle)
    return data / "HE" / "test" / "00020_test_3+.png", data / "IHC" / "test" / "00020_test_3+.png"


def test_predict_dual_prints_one_json_object(capsys, deployed_bundle: Path, pair) -> None:  # noqa: F811
    he, ihc = pair
    code, out, _ = _predict(capsys, deployed_bundle, "--he", str(he), "--ihc", str(ihc))
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert KEYS <= set(result)
    assert result["scenario"] == "dual" and result["score"] in CLASS_NAMES
    assert len(result["probabilities"]) == 4 and sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert result["confidence"] == pytest.approx(max(result["probabilities"]), abs=1e-6)
    # Default: the referral threshold stored with the model for the scenario.
    assert ("low_confidence" in result["refer_reasons"]) == (result["confidence"] < result["refer_threshold"])
    assert result["refer"] == bool(result["refer_reasons"])
    assert len(result["detected_stains"]) == 2

    # The threshold is configurable; the probabilities of a 4-class softmax lie in (0.25, 1).
    for threshold, refer in ((0.0, False), (1.0, True)):
        code, out, _ = _predict(
            capsys, deployed_bundle, "--he", str(he), "--ihc", str(ihc), f"--refer_threshold={threshold}"
        )
        result = json.loads(out)
        assert (
            code == 0
            and ("low_confidence" in result["refer_reasons"]) is refer
            and result["refer_threshold"] == threshold
        )


@pytest.mark.parametrize("stain", [0, 1])
def test_predict_image_of_unknown_stain_follows_the_selector(
    capsys,
    tmp_path: Path,
    deployed_bundle: Path,  # noqa: F811
    pair,
    stain: int,
) -> None:
    with_forced_selector(deployed_bundle, tmp_path, stain)
    code, out, _ = _predict(capsys, tmp_path, "--image", str(pair[1]))
    assert code == 0
    result = json.loads(out)
    assert result["scenario"] == ("he_only", "ihc_only")[stain]
    assert result["detected_stains"] == [("he", "ihc")[stain]] and result["stain_source"] == "selector"


def test_predict_bad_inputs_exit_2_with_one_line(capsys, tmp_path: Path, pair) -> None:
    he, _ = pair
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (["--he", str(tmp_path / "missing.png")], "missing.png: file not found"),
        (["--ihc", str(text)], "notes.png: not an image file"),
        ([], "no input image"),
        (["--image", str(he), "--he", str(he)], "not both"),
    ]
    for args, expected in cases:
        code, out, err = _predict(capsys, tmp_path, *args)
        assert code == 2, args
        assert out == "" and len(err.strip().splitlines()) == 1 and expected in err, (args, err)
    # A missing trained model is named with the command that makes it.
    code, _, err = _predict(capsys, tmp_path, "--he", str(he))
    assert code == 2 and "model.pt" in err and "monai.bundle run training" in err and len(err.strip().splitlines()) == 1


def test_predict_command_line_entry_point(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "her2_monai", "predict", "--he", str(tmp_path / "absent.png")],
        cwd=tmp_path,  # not the repository root: its bundle/models is the user's (README command 1)
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'absent.png'}: file not found"


def test_predict_help_lists_the_flags(capsys) -> None:
    assert main(["predict", "--help"]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err  # fire shows help on stderr when stdout is not a terminal
    flags = ("--he", "--ihc", "--image", "--bundle", "--refer_threshold")
    assert "predict" in text and all(flag in text for flag in flags)
