"""Shared fixtures: location of the real-image fixtures in ../shared/data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of many tiny networks: OpenMP start-up dominates, and two threads per process
    are several times slower when other processes share the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real histology fixtures; tests using it skip when it is absent (fail in CI, where it must be)."""
    if not (SHARED_DATA / "bci").is_dir():
        if os.environ.get("HER2_REQUIRE_SHARED_DATA"):
            pytest.fail(f"HER2_REQUIRE_SHARED_DATA is set but the real-image fixtures are not at {SHARED_DATA}")
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA} (they sit beside the repository in CI)")
    return SHARED_DATA


@contextmanager
def scratch_folder(request, tmp_path_factory, name: str) -> Iterator[Path]:
    """A module fixture's folder, removed when the fixture ends unless a test has failed by then.

    Use it as ``with scratch_folder(...) as root:`` around the fixture's ``yield``; a fixture that raises keeps it.

    The bundle runs of the module fixtures write several 100-500 MB checkpoints each; ``tmp_path_retention_policy``
    only covers ``tmp_path``, so without this a full session keeps about 10 GB on disk until it ends.
    """
    folder = tmp_path_factory.mktemp(name)
    yield folder
    if request.session.testsfailed == 0:
        shutil.rmtree(folder, ignore_errors=True)


BUNDLE_CONFIGS = REPO_ROOT / "bundle" / "configs"

#: Overrides that shrink the training bundle to seconds: tiny demo set, tiny networks, one epoch per stage.
TINY_TRAINING = {
    "demo_n_per_class": 4,
    "demo_image_size": 32,
    "image_size": 32,
    "gan_epochs": 1,
    "gan_batch_size": 4,
    "gan_ngf": 8,
    "gan_n_blocks": 1,
    "gan_ndf": 8,
    "cls_epochs": 1,
    "early_stop_patience": 0,
    "batch_size": 4,
    "shared_backbone": "resnet18",
    "specific_backbone": "resnet10",
    "selector_epochs": 1,
    "selector_steps_per_epoch": 2,
    "selector_batch_size": 4,
    "selector_crop_size": 32,
    "selector_image_size": 32,
    "selector_per_class": 1,
    "selector_labs": ["A"],
}


def tiny_overrides(bundle_root: Path, cache_dir: Path, **extra) -> dict:
    """Overrides for a tiny run of the training config writing into ``bundle_root``."""
    return {**TINY_TRAINING, "bundle_root": str(bundle_root), "demo_cache_dir": str(cache_dir), **extra}


def bundle_component(config_files, component_id: str, **overrides):
    """Build one component (e.g. ``"train#preprocessing"``) of the bundle configs with overrides, as the bundle does."""
    from monai.bundle import ConfigParser

    files = [str(BUNDLE_CONFIGS / f) for f in ([config_files] if isinstance(config_files, str) else config_files)]
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    return parser.get_parsed_content(component_id)


def run_bundle(config_files, run_id: str, **overrides):
    """Run one workflow id of the bundle in-process with ``ConfigWorkflow`` and return the workflow."""
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE_CONFIGS / f) for f in ([config_files] if isinstance(config_files, str) else config_files)]
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(BUNDLE_CONFIGS / "metadata.json") if (BUNDLE_CONFIGS / "metadata.json").exists() else None,
        logging_file=None,
        workflow_type="train" if run_id.startswith("train") else "infer",
        run_id=run_id,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """A bundle output folder after a tiny two-stage training run (shared by evaluation, inference and export tests)."""
    root = tmp_path_factory.mktemp("bundle")
    run_bundle("train.json", "training", **tiny_overrides(root, root / "cache"))
    return root
