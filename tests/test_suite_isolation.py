"""The suite's result does not depend on the user's own bundle state (README command 2 after README command 1).

A copy of the repository's tests and configs gets a decoy ``bundle/models/model.pt`` (bytes that are no model) and
``bundle/eval`` and ``.cache`` that are files, not folders, so that any test reading the user's model or writing the
user's outputs fails; a sample of the suite (the tests that once read ``bundle/models``, and tests that start
subprocesses from the repository root) must still pass there, and the decoys must be untouched afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

#: Tests that once depended on the user's bundle folder, and tests that run commands from the repository root.
SAMPLE = (
    "tests/test_bundle_export.py::test_network_def_passes_verify_net_in_out",
    "tests/test_cli_predict.py::test_predict_command_line_entry_point",
    "tests/test_cli_predict.py::test_predict_bad_inputs_exit_2_with_one_line",
    "tests/test_runtime.py",
)
DECOYS = {
    "bundle/models/model.pt": b"decoy: not a model file",
    "bundle/models/model.pt.sha256": b"0" * 64 + b"  model.pt\n",
    "bundle/eval": b"decoy: a file where the evaluation folder would be",
    ".cache": b"decoy: a file where the demo cache would be",
}


def _copy_repository(target: Path) -> None:
    for name in ("tests", "benchmarks", "scripts", "docs", "her2_monai"):
        shutil.copytree(REPO_ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "bundle", target / "bundle", ignore=shutil.ignore_patterns("models", "eval"))
    for name in ("README.md", "pyproject.toml", "LICENSE"):
        shutil.copy(REPO_ROOT / name, target / name)


def test_a_sample_of_the_suite_passes_beside_a_decoy_model(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_repository(repo)
    shared = REPO_ROOT.parent / "shared"
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared)
    for name, content in DECOYS.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)

    # The copy's tests import the copy's package first (PYTHONPATH), so they run the code under test, not an install.
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("HER2_REQUIRE_SHARED_DATA", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SAMPLE],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout.strip().splitlines()[-1] and "failed" not in done.stdout.splitlines()[-1], tail
    for name, content in DECOYS.items():
        assert (repo / name).read_bytes() == content, f"{name} was changed by the sample"
