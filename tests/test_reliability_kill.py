"""Fault catalogue, kill -9 (docs/reliability.md): training killed at 5 points in each stage and evaluation at 5
points, each time resumed with ``--resume true``, ends with the same weights and test metrics as a run that was
never interrupted.

One chain of forked processes (see ``kill_points.py``): the first trains until the first kill point and is killed
with SIGKILL; each next one resumes (``--resume true``) until the next point and is killed too; the last one
finishes. Every kill point is exact (the child blocks there before it is killed), so the files on disk are those
of a real crash at that point. Because a resume restores every random state, the finished run must equal the
uninterrupted reference bit for bit -- which holds only if every one of the 15 training resumes was exact.
The evaluation of the resumed bundle is then killed at 5 points and run again, and its ``eval/metrics.json`` must
equal the reference's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS, scratch_folder, tiny_overrides
from kill_points import BundleRunner, KillPoint

pytestmark = pytest.mark.slow

EPOCHS = 3
#: The tiny bundle with 3 epochs per stage, ResNet10 encoders (fast, small checkpoints) and no MLflow.
SETTINGS = {
    "tracker": "none",
    "selector_epochs": EPOCHS,
    "gan_epochs": EPOCHS,
    "cls_epochs": EPOCHS,
    "shared_backbone": "resnet10",
    "specific_backbone": "resnet10",
}
TRAIN = [str(BUNDLE_CONFIGS / "train.json")]
EVALUATE = [str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "evaluate.json")]


@dataclass(frozen=True)
class Step:
    """A kill point and what the files and the next run must show."""

    point: KillPoint
    on_disk: dict  # file name -> expected epoch of its trainer state, None = absent, "tmp" = a leftover temporary
    next_log: tuple[str, ...] = ()  # patterns the log of the resuming run must contain


def _event(name, engine, event, epoch=None):
    return KillPoint(name, "event", engine=engine, event=event, epoch=epoch)


TRAINING_STEPS = [
    # stage 0, the branch selector (no resume checkpoint: a resumed run trains it again from the seed)
    Step(_event("selector-start", "SupervisedTrainer", "STARTED"), {"selector.pt": None}),
    Step(_event("selector-validated", "SupervisedEvaluator", "COMPLETED", 2), {"selector.pt": None}),
    Step(_event("selector-last-epoch", "SupervisedTrainer", "EPOCH_COMPLETED", 3), {"selector.pt": None}),
    Step(
        KillPoint("selector-write", "replace", file="selector.pt"), {"selector.pt": "tmp"}, ("removed .*selector.pt",)
    ),
    Step(KillPoint("selector-checksum", "checksum", file="selector.pt"), {"selector.pt.sha256": None}),
    # stage 1, the CM-GAN
    Step(
        _event("gan-start", "CrossModalGANTrainer", "STARTED"), {"gan_checkpoint.pt": None}, ("starting from scratch",)
    ),
    Step(
        _event("gan-validated", "TranslationEvaluator", "COMPLETED", 2),
        {"gan_checkpoint.pt": 1},
        (r"resumed from \S+gan_checkpoint.pt at epoch 1",),
    ),
    Step(
        KillPoint("gan-write", "replace", file="gan_checkpoint.pt"),
        {"gan_checkpoint.pt": 1, ".gan_checkpoint.pt": "tmp"},
        (r"removed \S+\.gan_checkpoint\.pt\.\S+\.tmp", r"resumed from \S+gan_checkpoint.pt at epoch 1"),
    ),
    Step(
        KillPoint("gan-checksum", "checksum", file="gan_checkpoint.pt"),
        {"gan_checkpoint.pt": 2, "gan_checkpoint.pt.sha256": None},
        (r"gan_checkpoint.pt has no .sha256 file", r"resumed from \S+gan_checkpoint.pt at epoch 2"),
    ),
    Step(
        KillPoint("gan-final-weights", "replace", file="cmgan.pt"),
        {"gan_checkpoint.pt": 3, "cmgan.pt": "tmp"},
        (r"resumed from \S+gan_checkpoint.pt at epoch 3",),
    ),
    # stage 2, the classifier (the CM-GAN and selector stored by reference in its checkpoint)
    Step(
        _event("classifier-start", "HER2Trainer", "STARTED"),
        {"classifier_checkpoint.pt": None, "cmgan.pt": "exists"},
        ("starting from scratch",),
    ),
    Step(
        _event("classifier-validated", "ScenarioEvaluator", "COMPLETED", 1),
        {"classifier_checkpoint.pt": None, "model.pt": "exists"},
        ("starting from scratch",),
    ),
    Step(
        KillPoint("classifier-write", "replace", file="classifier_checkpoint.pt"),
        {"classifier_checkpoint.pt": "tmp"},
        (r"removed \S+\.classifier_checkpoint\.pt\.\S+\.tmp",),
    ),
    Step(
        _event("classifier-between-epochs", "HER2Trainer", "EPOCH_STARTED", 2),
        {"classifier_checkpoint.pt": 1},
        (r"resumed from \S+classifier_checkpoint.pt at epoch 1",),
    ),
    Step(
        KillPoint("classifier-checksum", "checksum", file="classifier_checkpoint.pt"),
        {"classifier_checkpoint.pt": 2, "classifier_checkpoint.pt.sha256": None},
        (r"classifier_checkpoint.pt has no .sha256 file", r"resumed from \S+classifier_checkpoint.pt at epoch 2"),
    ),
]

EVALUATION_STEPS = [
    Step(_event("evaluation-start", "ScenarioEvaluator", "STARTED"), {"metrics.json": None}),
    Step(_event("evaluation-scenarios-done", "ScenarioEvaluator", "COMPLETED"), {"metrics.json": None}),
    Step(_event("evaluation-translation", "TranslationEvaluator", "STARTED"), {"metrics.json": None}),
    Step(KillPoint("evaluation-figure", "replace", file="confusion_matrices.png"), {"confusion_matrices.png": "tmp"}),
    Step(KillPoint("evaluation-report", "replace", file="metrics.json"), {"metrics.json": "tmp"}),
]


def _trainer_epoch(path: Path) -> int:
    state = torch.load(path, weights_only=True, mmap=True)["trainer"]
    return int(state["iteration"]) // int(state["epoch_length"])


def _on_disk(folder: Path, name: str) -> object:
    """What ``folder`` holds for ``name``: a trainer epoch, "exists", "tmp" (a leftover temporary) or None."""
    if name.startswith("."):
        return "tmp" if list(folder.glob(f"{name}.*.tmp")) else None
    path = folder / name
    if not path.exists():
        return "tmp" if list(folder.glob(f".{name}.*.tmp")) else None
    return _trainer_epoch(path) if name.endswith("_checkpoint.pt") else "exists"


_ARCHITECTURE = ("shared_backbone", "specific_backbone", "gan_ngf", "gan_n_blocks", "image_size")


def _data_only(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _ARCHITECTURE}


@dataclass
class Chain:
    """What the chain of killed and resumed runs left: per kill point, the files and the next run's log."""

    reference: Path
    resumed: Path
    on_disk: dict
    next_logs: dict


@pytest.fixture(scope="module")
def chain(request, tmp_path_factory) -> Iterator[Chain]:
    with scratch_folder(request, tmp_path_factory, "kill") as root:
        cache = root / "cache"
        reference, resumed = root / "reference", root / "resumed"
        train_runner = BundleRunner(TRAIN, root / "logs")
        eval_runner = BundleRunner(EVALUATE, root / "logs")

        def overrides(bundle: Path, **extra) -> dict:
            return tiny_overrides(bundle, cache, **SETTINGS, **extra)

        train_runner.run("training", overrides(reference))
        eval_runner.run("evaluating", _data_only(overrides(reference)))

        on_disk, next_logs = {}, {}
        for steps, runner, run_id, folder, settings in (
            (TRAINING_STEPS, train_runner, "training", resumed / "models", overrides(resumed)),
            (EVALUATION_STEPS, eval_runner, "evaluating", resumed / "eval", _data_only(overrides(resumed))),
        ):
            resume = {"resume": True} if run_id == "training" else {}
            run_logs = []
            for index, step in enumerate(steps):
                first = index == 0 and run_id == "training"
                run_logs.append(runner.kill_at(run_id, settings if first else {**settings, **resume}, step.point))
                on_disk[step.point.name] = {name: _on_disk(folder, name) for name in step.on_disk}
            run_logs.append(runner.run(run_id, {**settings, **resume}))
            for step, after in zip(steps, run_logs[1:]):  # the run after a kill is the next one in the chain
                next_logs[step.point.name] = after.read_text(errors="replace")
        yield Chain(reference, resumed, on_disk, next_logs)


@pytest.mark.parametrize("step", TRAINING_STEPS + EVALUATION_STEPS, ids=lambda s: s.point.name)
def test_killed_at(chain: Chain, step: Step) -> None:
    """The kill left the expected files, and the run after it resumed from them as it should."""
    assert chain.on_disk[step.point.name] == step.on_disk
    log = chain.next_logs[step.point.name]
    for pattern in step.next_log:
        assert re.search(pattern, log), f"'{pattern}' not in the log of the run after {step.point.name}"
    assert "taking over the training lock" in log or step in EVALUATION_STEPS  # the killed run's stale lock


def _tensors(path: Path) -> dict:
    return {k: v for k, v in torch.load(path, weights_only=True).items() if isinstance(v, torch.Tensor)}


def test_the_resumed_training_equals_the_uninterrupted_one(chain: Chain) -> None:
    for name in ("selector.pt", "cmgan.pt", "model.pt"):
        expected, found = _tensors(chain.reference / "models" / name), _tensors(chain.resumed / "models" / name)
        assert expected.keys() == found.keys()
        different = [k for k in expected if not torch.equal(expected[k], found[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    reference = torch.load(chain.reference / "models" / "classifier_checkpoint.pt", weights_only=True)
    resumed = torch.load(chain.resumed / "models" / "classifier_checkpoint.pt", weights_only=True)
    assert resumed["best"] == reference["best"]  # the best validation macro-F1 and its epoch
    assert (
        resumed["trainer"]["iteration"]
        == reference["trainer"]["iteration"]
        == EPOCHS * resumed["trainer"]["epoch_length"]
    )
    leftovers = [p.name for p in (chain.resumed / "models").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def _assert_same_report(found, expected, where: str = "metrics") -> None:
    """Nested report values equal, numbers within 1e-6 (``pytest.approx`` does not descend into nested dicts)."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys(), where
        for key in expected:
            _assert_same_report(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), where
        for index, (a, b) in enumerate(zip(found, expected)):
            _assert_same_report(a, b, f"{where}[{index}]")
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        assert found == pytest.approx(expected, abs=1e-6, nan_ok=True), where
    else:
        assert found == expected, where


def test_the_resumed_evaluation_reports_the_same_test_metrics(chain: Chain) -> None:
    expected = json.loads((chain.reference / "eval" / "metrics.json").read_text())
    found = json.loads((chain.resumed / "eval" / "metrics.json").read_text())
    for scenario in ("dual", "he_only", "ihc_only"):
        _assert_same_report(found["scenarios"][scenario], expected["scenarios"][scenario], scenario)
    _assert_same_report(found["translation"], expected["translation"], "translation")
