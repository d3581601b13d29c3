"""Shared fixtures: location of the real-image fixtures in ../shared/data, tiny bundle runs, and the suite's rules.

Two rules hold for every test (README command 2 must pass on any machine, after README command 1):

* **The user's bundle state is out of bounds.** No test reads or writes the repository's own ``bundle/models``,
  ``bundle/eval`` or ``.cache`` (README command 1 trains into them): each test gets its bundle root under a temporary
  folder. An audit hook records every file this process opens, lists, creates or removes there, and the test that did
  it fails with the path; a snapshot taken at the start of the session catches subprocesses that wrote there, and
  ``tests/test_suite_isolation.py`` runs a sample of the suite beside a decoy ``model.pt``.
* **Results must not depend on the CPU's arithmetic.** The bundle picks bfloat16 autocast on CPUs with bf16 hardware
  (``her2_monai.runtime``) and float32 elsewhere; oneDNN's kernels also change with the thread count, the batch size and
  the memory format. A test that compares two paths runs both under the same execution settings or pins float32 for
  the comparison (:func:`pinned_fp32`); a test that checks the default path takes its tolerance from the arithmetic
  (:func:`probability_tolerance`) and is marked ``arithmetic``. ``.ci/run`` runs the ``arithmetic`` tests a second
  time with ``HER2_CPU_PRECISION=bf16``, so the bf16 path is checked whatever CPU CI has.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: The user's own bundle state (README command 1 writes it); no test may touch it.
USER_STATE = tuple(REPO_ROOT / part for part in ("bundle/models", "bundle/eval", ".cache"))
_USER_PREFIXES = tuple(str(p) for p in USER_STATE)
#: Audited events that name a path as their first argument (``os.rename`` names two).
_PATH_EVENTS = frozenset(
    {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rmdir", "os.rename", "shutil.rmtree",
     "sqlite3.connect", "os.chmod", "os.utime", "os.truncate"}
)  # fmt: skip
_touched: list[str] = []


_auditing = [True]  # off while the session's own snapshot lists the folders


def _user_state_path(path) -> str | None:
    """``path`` made absolute when it lies in the user's bundle state, else ``None``."""
    if path is None or isinstance(path, int):
        return None
    try:
        name = os.fsdecode(path)
    except TypeError:
        return None
    if os.sep not in name:
        # A bare name is relative to a folder descriptor as often as to the working folder (shutil.rmtree walks a
        # tree with dir_fd, and the "open" event does not say which); the user's state is never reached by a bare
        # name anyway: its files lie one or more folders down.
        return None
    full = os.path.abspath(name)
    return full if any(full == p or full.startswith(p + os.sep) for p in _USER_PREFIXES) else None


def _audit_user_state(event: str, args: tuple) -> None:
    if _auditing[0] and event in _PATH_EVENTS and args:
        for path in args[:2] if event == "os.rename" else args[:1]:
            if (full := _user_state_path(path)) is not None:
                _touched.append(f"{event} {full}")


sys.addaudithook(_audit_user_state)


@pytest.fixture(autouse=True)
def _user_state_untouched() -> Iterator[None]:
    """Fail the test that read or wrote the repository's own ``bundle/models``, ``bundle/eval`` or ``.cache``."""
    start = len(_touched)
    yield
    used = sorted(set(_touched[start:]))
    if used:
        pytest.fail(
            f"the test used the user's own bundle state ({', '.join(used[:5])}); give it a bundle_root (and "
            "demo_cache_dir) under tmp_path",
            pytrace=False,
        )


def _snapshot() -> dict[str, tuple[int, int]]:
    _auditing[0] = False
    try:
        return {
            str(f.relative_to(REPO_ROOT)): (f.stat().st_size, f.stat().st_mtime_ns)
            for root in USER_STATE
            if root.is_dir()
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }
    finally:
        _auditing[0] = True


def pytest_sessionstart(session) -> None:
    session.config._her2_user_state = _snapshot()


def pytest_sessionfinish(session, exitstatus) -> None:
    before = getattr(session.config, "_her2_user_state", None)
    if before is None:
        return
    after = _snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (
            f"the suite changed the user's own bundle state ({len(changed)} files, e.g. {', '.join(changed[:5])}): "
            "a test (or a subprocess it started) wrote under bundle/models, bundle/eval or .cache"
        )
        if reporter is not None:
            reporter.write_line("ERROR: " + message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def probability_tolerance(fp32: float, device: str = "cpu") -> float:
    """Tolerance for comparing the bundle's default path with a float32 reference on this machine.

    Args:
        fp32: the tolerance when the default path is float32 (only summation order differs).
        device: the device the default path runs on.

    Returns:
        ``fp32`` under float32 arithmetic; under bfloat16 autocast 2e-2: bf16 keeps 8 bits of mantissa (a relative
        rounding of 2**-9 per operation), and through a small ResNet the class probabilities move by up to ~1e-3
        measured (AMX and AVX-512 BF16 CPUs), ~1e-2 in the worst cases; the bound leaves room for that and no more.
    """
    from her2_monai.runtime import execution_settings

    return 2e-2 if execution_settings(device).amp else fp32


@contextmanager
def pinned_fp32(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Float32 execution settings for the code run inside (``HER2_CPU_PRECISION=fp32``), e.g. for a comparison of two
    paths whose difference must be that of the paths, not of the arithmetic."""
    from her2_monai import runtime

    with monkeypatch.context() as patch:
        patch.setenv(runtime.PRECISION_ENV, "fp32")
        yield


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
def default_selector_file(tmp_path_factory) -> Path:
    """``selector.pt`` trained once by the bundle's stage 0 with train.json's own selector settings (procedural demo
    renders only), for the tests that check that selector on real images."""
    root = tmp_path_factory.mktemp("default_selector")
    run_bundle("train.json", "train_selector", bundle_root=str(root), tracker="none", demo_cache_dir=str(root / "c"))
    return root / "models" / "selector.pt"


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """A bundle output folder after a tiny two-stage training run (shared by evaluation, inference and export tests)."""
    root = tmp_path_factory.mktemp("bundle")
    run_bundle("train.json", "training", **tiny_overrides(root, root / "cache"))
    return root
