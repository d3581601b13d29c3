"""Fault catalogue, model files (docs/reliability.md): checksums written beside every model file and checked before
loading, pickles with code refused everywhere, frozen stage-2 parts stored by reference in the resume checkpoint."""

from __future__ import annotations

import ast
import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_CONFIGS, REPO_ROOT
from ignite.engine import Engine
from monai.transforms import Compose, RandFlipd, RandGaussianNoised
from PIL import Image

from her2_monai.cli import main
from her2_monai.fileio import ChecksumMismatchError, atomic_torch_save, checksum_path, sha256_file, verify_checksum
from her2_monai.handlers import (
    CheckpointHandler,
    FrozenByReference,
    RandomStates,
    ResumeCheckpointLoader,
    VerifiedCheckpointLoader,
)
from her2_monai.handlers.resume_state import REFERENCES_KEY
from her2_monai.networks import BranchSelector, CrossModalGAN, HER2FlexibleNet
from her2_monai.networks.factory import frozen_cmgan, read_weights


class _CodeInPickle:
    """Unpickling this runs a command that would create ``marker`` (a model file with code in it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.fixture(scope="module")
def small_gan() -> CrossModalGAN:
    torch.manual_seed(0)
    return CrossModalGAN(ngf=4, n_blocks=1)


# ------------------------------------------------------------------------------------------------ checksums
def test_every_saved_model_file_gets_a_sha256sum_compatible_checksum(tmp_path, small_gan):
    path = tmp_path / "models" / "cmgan.pt"
    saver = CheckpointHandler(path, {"cmgan": small_gan}, event="completed")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    record = checksum_path(path)
    assert record.name == "cmgan.pt.sha256"
    assert record.read_text() == f"{sha256_file(path)}  cmgan.pt\n"
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", record.name], cwd=path.parent, capture_output=True, text=True)
        assert check.returncode == 0 and "cmgan.pt: OK" in check.stdout
    # The same weights written again give the same bytes (torch names the archive records "archive/").
    first = path.read_bytes()
    atomic_torch_save(small_gan.state_dict(), path, checksum=True)
    assert path.read_bytes() == first and verify_checksum(path)


def test_a_model_file_that_differs_from_its_checksum_is_refused_everywhere(capsys, tmp_path, small_gan):
    path = tmp_path / "models" / "cmgan.pt"
    atomic_torch_save(small_gan.state_dict(), path, checksum=True)
    tampered = dict(small_gan.state_dict())
    tampered["he_to_ihc.model.1.weight"] = tampered["he_to_ihc.model.1.weight"] + 1
    torch.save(tampered, path)  # a loadable file with other weights, its checksum left behind
    with pytest.raises(ChecksumMismatchError, match="does not match its checksum .*changed or damaged"):
        read_weights(path)
    with pytest.raises(ChecksumMismatchError):
        frozen_cmgan(path)  # the loader of stage 1's file
    loader = VerifiedCheckpointLoader(load_path=str(path), load_dict={"cmgan": CrossModalGAN(ngf=4, n_blocks=1)})
    with pytest.raises(ChecksumMismatchError):
        loader(Engine(lambda e, b: None))  # stage 2's loader of cmgan.pt / selector.pt
    # predict: exit 2, one line naming the file
    bundle = tmp_path
    shutil.copy(path, bundle / "models" / "model.pt")
    shutil.copy(checksum_path(path), checksum_path(bundle / "models" / "model.pt"))
    he, config = tmp_path / "he.png", BUNDLE_CONFIGS / "inference.json"
    Image.new("RGB", (32, 32), (200, 120, 180)).save(he)
    code = main(["predict", "--he", str(he), "--bundle", str(bundle), "--config_file", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not match its checksum" in err


def test_a_checksum_file_that_is_not_one_is_refused(tmp_path, small_gan):
    path = tmp_path / "cmgan.pt"
    atomic_torch_save(small_gan.state_dict(), path, checksum=True)
    checksum_path(path).write_text("garbage\n")
    with pytest.raises(ChecksumMismatchError, match="is not a SHA-256 checksum file"):
        read_weights(path)


def test_a_model_file_without_checksum_loads_with_one_warning(tmp_path, small_gan, caplog):
    path = tmp_path / "old.pt"
    torch.save(small_gan.state_dict(), path)  # written by an older version: no .sha256
    with caplog.at_level(logging.WARNING, logger="her2_monai.fileio"):
        read_weights(path)
        read_weights(path)
    warned = [r for r in caplog.records if "has no .sha256 file" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0].getMessage()


# -------------------------------------------------------------------------------------- pickles with code
def test_a_pickle_with_code_is_refused_by_every_loader_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": _CodeInPickle(marker)}, path)
    with pytest.raises(ValueError, match="is not a plain weights file.*refusing to load it"):
        read_weights(path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        VerifiedCheckpointLoader(load_path=str(path), load_dict={"m": torch.nn.Linear(1, 1)})(Engine(lambda e, b: 0))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ResumeCheckpointLoader(path, {"m": torch.nn.Linear(1, 1)})(Engine(lambda e, b: 0))
    assert not marker.exists()


def _torch_load_calls(source: str) -> list[tuple[int, bool]]:
    """``(line, has weights_only=True)`` for every ``torch.load(...)`` call in Python source."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_project_uses_weights_only():
    roots = [REPO_ROOT / "her2_monai", REPO_ROOT / "benchmarks", REPO_ROOT / "scripts"]
    files = [p for root in roots if root.is_dir() for p in sorted(root.rglob("*.py"))]
    unsafe, found = [], 0
    for path in files:
        for line, safe in _torch_load_calls(path.read_text()):
            found += 1
            if not safe:
                unsafe.append(f"{path.relative_to(REPO_ROOT)}:{line}")
    assert found >= 2, "the scan found no torch.load call at all: it is not scanning the package"
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    # In the bundle configs, torch.load would sit inside "$" expressions.
    for config in sorted((REPO_ROOT / "bundle" / "configs").glob("*.json")):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", config.read_text()):
            assert "weights_only=True" in match.group(1), f"{config.name}: {match.group(0)}"
    # pickle itself is never used to read files
    for path in files:
        assert not re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load", path.read_text()), path


def test_the_grep_test_sees_an_unsafe_call():
    assert _torch_load_calls("import torch\ntorch.load('x.pt')\ntorch.load(f, weights_only=True)\n") == [
        (2, False),
        (3, True),
    ]


# ------------------------------------------------------------------------ frozen parts stored by reference
@pytest.fixture()
def stage2(tmp_path):
    """A stage-2 network whose CM-GAN and selector were loaded from their files, as the bundle does."""
    torch.manual_seed(1)
    models = tmp_path / "models"
    gan, selector = CrossModalGAN(ngf=4, n_blocks=1), BranchSelector()
    atomic_torch_save(gan.state_dict(), models / "cmgan.pt", checksum=True)
    atomic_torch_save(selector.state_dict(), models / "selector.pt", checksum=True)
    net = HER2FlexibleNet(
        shared_backbone="resnet10", specific_backbone="resnet10", cmgan=CrossModalGAN(ngf=4, n_blocks=1),
        selector=BranchSelector(),
    )  # fmt: skip
    net.cmgan.load_state_dict(torch.load(models / "cmgan.pt", weights_only=True))
    net.selector.load_state_dict(torch.load(models / "selector.pt", weights_only=True))
    files = {"cmgan": models / "cmgan.pt", "selector": models / "selector.pt"}
    return net, files


def test_the_resume_checkpoint_refers_to_the_frozen_parts_and_restores_them(tmp_path, stage2):
    net, files = stage2
    entry = FrozenByReference(net, files).state_dict()
    assert not [k for k in entry if k.startswith(("cmgan.", "selector."))]
    assert set(entry[REFERENCES_KEY]) == {"cmgan", "selector"}
    full = net.state_dict()
    torch.save(full, tmp_path / "copy.pt")
    torch.save(entry, tmp_path / "by_reference.pt")
    assert (tmp_path / "by_reference.pt").stat().st_size < (tmp_path / "copy.pt").stat().st_size

    torch.manual_seed(2)
    fresh = HER2FlexibleNet(
        shared_backbone="resnet10", specific_backbone="resnet10", cmgan=CrossModalGAN(ngf=4, n_blocks=1),
        selector=BranchSelector(),
    )  # fmt: skip
    FrozenByReference(fresh, files).load_state_dict(torch.load(tmp_path / "by_reference.pt", weights_only=True))
    restored = fresh.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in full.items() if isinstance(v, torch.Tensor))


def test_resume_refuses_frozen_files_that_changed_or_vanished(tmp_path, stage2):
    net, files = stage2
    entry = FrozenByReference(net, files).state_dict()
    # Rewriting the same weights is fine (another file, same content) ...
    atomic_torch_save(torch.load(files["cmgan"], weights_only=True), files["cmgan"], checksum=True)
    FrozenByReference(net, files).load_state_dict(entry)
    # ... other weights are not.
    other = CrossModalGAN(ngf=4, n_blocks=1)
    atomic_torch_save(other.state_dict(), files["cmgan"], checksum=True)
    with pytest.raises(ChecksumMismatchError, match="holds other weights than when the resume checkpoint"):
        FrozenByReference(net, files).load_state_dict(entry)
    files["selector"].unlink()
    with pytest.raises(FileNotFoundError, match="selector.pt.*start the stage again without --resume"):
        FrozenByReference(net, {"selector": files["selector"]}).load_state_dict(
            {**entry, REFERENCES_KEY: {"selector": entry[REFERENCES_KEY]["selector"]}}
        )


def test_a_part_that_changed_during_training_is_kept_by_copy(stage2, caplog):
    net, files = stage2
    with torch.no_grad():
        next(net.cmgan.parameters()).add_(1.0)  # e.g. a CM-GAN trained on in stage 2 (freeze_cmgan false)
    with caplog.at_level(logging.WARNING):
        entry = FrozenByReference(net, files).state_dict()
    assert set(entry[REFERENCES_KEY]) == {"selector"} and any(k.startswith("cmgan.") for k in entry)
    assert "keeps a copy of 'cmgan'" in caplog.text


# ----------------------------------------------------------------------------------------- random states
def test_random_states_restore_every_generator_an_epoch_draws_from():
    chain = Compose([RandFlipd("x", prob=0.5), RandGaussianNoised("x", prob=1.0)])
    chain.set_random_state(seed=3)
    states = RandomStates([{"dataset": [chain]}])
    assert len(states.transforms()) == 3  # the Compose and its two random transforms
    saved = states.state_dict()
    expected = (torch.rand(3), np.random.rand(2), chain.transforms[1].R.rand(), __import__("random").random())
    states.load_state_dict(saved)
    again = (torch.rand(3), np.random.rand(2), chain.transforms[1].R.rand(), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]
    with pytest.raises(ValueError, match="random states of 3 transforms, this pipeline has 0"):
        RandomStates([]).load_state_dict(saved)
