"""A bundle run that stops on a known problem ends on that problem and its fix: the last line of stderr.

Each case runs the real command a user types (``python -m monai.bundle run ...``) in a subprocess: a dataset too
small to validate on (``DataCheckError``), an architecture override that disagrees with the model file
(``ArchitectureOverrideError``) and a model file that no longer matches its checksum (``ChecksumMismatchError``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUNDLE_CONFIGS

from her2_monai.errors import DEBUG_ENV, error_line, find_known_error

TRAIN = str(BUNDLE_CONFIGS / "train.json")
INFERENCE = str(BUNDLE_CONFIGS / "inference.json")


def _bundle(cwd: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(DEBUG_ENV, None)
    if debug:
        env[DEBUG_ENV] = "1"
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _last_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_a_dataset_too_small_to_validate_on_ends_on_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "four_pairs"
    made = subprocess.run(
        [sys.executable, "-m", "her2_monai", "demo-data", "--output", str(data), "--n_per_class", "1",
         "--image_size", "32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    args = ("training", "--config_file", TRAIN, "--dataset_dir", str(data), "--bundle_root", str(tmp_path / "b"))
    args += ("--tracker", "none", "--val_fraction", "0.0")
    run = _bundle(tmp_path, *args)
    assert run.returncode != 0
    last = _last_line(run)
    assert last.startswith("error: DataCheckError: ") and "Fix:" in last, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "ConfigExpression" not in run.stderr

    debug = _bundle(tmp_path, *args, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and _last_line(debug) == last


def test_an_override_that_disagrees_with_the_model_and_a_damaged_model_end_on_their_fix(
    trained_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle / "models", bundle / "models")
    images = tmp_path / "images"
    images.mkdir()
    demo = next((trained_bundle / "cache").rglob("*.png"))
    shutil.copy(demo, images / "patch.png")
    common = ("inferring", "--config_file", INFERENCE, "--bundle_root", str(bundle), "--dataset_dir", str(images))

    override = _bundle(tmp_path, *common, "--gan_ngf", "4")
    assert override.returncode != 0
    last = _last_line(override)
    assert last.startswith("error: ArchitectureOverrideError: ") and "Drop the override" in last, override.stderr[
        -3000:
    ]

    checksum = bundle / "models" / "model.pt.sha256"
    checksum.write_text("0" * 64 + "  model.pt\n")
    damaged = _bundle(tmp_path, *common)
    assert damaged.returncode != 0
    last = _last_line(damaged)
    assert last.startswith("error: ChecksumMismatchError: ") and "restore or retrain it" in last, damaged.stderr[-3000:]


def test_known_errors_are_found_through_monai_wrappers_and_others_are_not() -> None:
    from her2_monai.data.checks import DataCheckError

    try:
        try:
            raise DataCheckError("stage 1 would validate on zero samples.\nFix: raise --val_fraction")
        except DataCheckError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err
    except RuntimeError as wrapped:
        found = find_known_error(wrapped)
    assert isinstance(found, DataCheckError)
    assert (
        error_line(found) == "error: DataCheckError: stage 1 would validate on zero samples. Fix: raise --val_fraction"
    )
    assert find_known_error(RuntimeError("something else")) is None
    with pytest.raises(ZeroDivisionError):  # an unknown error is not swallowed by the search
        raise ZeroDivisionError from find_known_error(ValueError("plain"))
