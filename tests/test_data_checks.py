"""The training data check, batch sizes fitted to small sets, promised outputs and machine-derived defaults."""

from __future__ import annotations

import json
import logging
import os

import pytest

from her2_monai.data import checks
from her2_monai.data.checks import DataCheckError, ExpectedOutputs, TrainingDataPlan, choose_cache_rate


def _record(i: int, label: int | None = None, both: bool = True) -> dict:
    return {"id": f"{i:05d}_train_x", "he": f"/x/he{i}.png", "ihc": f"/x/ihc{i}.png" if both else None, "label": label}


def _datalist(tmp_path, n_train: int, n_val: int, labelled: bool = True) -> str:
    content = {
        "training": [_record(i, i % 4 if labelled else None) for i in range(n_train)],
        "validation": [_record(100 + i, i % 4 if labelled else None) for i in range(n_val)],
        "test": [],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_small_training_set_caps_the_batch_size_with_one_warning(tmp_path, caplog):
    plan = TrainingDataPlan(_datalist(tmp_path, 4, 2), batch_size=8, gan_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="her2_monai.data.checks"):
        assert plan.check(["gan", "classifier"]) is plan
        assert plan.batch_size("classifier") == 4 and plan.batch_size("gan") == 2
        assert plan.batch_size("classifier") == 4
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert "4 training labelled records are fewer than --batch_size 8; training with batch size 4" in lines[0]


@pytest.mark.parametrize(
    ("n_train", "n_val", "stage", "expected"),
    [
        (4, 0, "classifier", "stage 2 (classifier) would validate on zero samples"),
        (4, 0, "gan", "stage 1 (CM-GAN) would validate on zero samples"),
        (1, 2, "classifier", "would train on zero batches: 1 training labelled records"),
        (0, 2, "gan", "would train on zero batches: 0 training H&E/IHC pairs"),
    ],
)
def test_a_stage_with_nothing_to_train_or_validate_fails_with_counts_and_fix(tmp_path, n_train, n_val, stage, expected):
    plan = TrainingDataPlan(_datalist(tmp_path, n_train, n_val), batch_size=8, gan_batch_size=2)
    with pytest.raises(DataCheckError) as err:
        plan.check([stage])
    message = str(err.value)
    assert expected in message
    assert f"{n_train} training and {n_val} validation" in message
    assert ("--batch_size 8" if stage == "classifier" else "--gan_batch_size 2") in message
    assert "Fix:" in message and ("--val_fraction" in message or "add data" in message)


def test_unlabelled_pairs_train_the_gan_but_not_the_classifier(tmp_path):
    plan = TrainingDataPlan(_datalist(tmp_path, 6, 2, labelled=False), batch_size=8, gan_batch_size=2)
    plan.check(["gan"])
    with pytest.raises(DataCheckError, match="would train on zero batches: 0 training labelled records"):
        plan.check(["classifier"])


def test_ddp_needs_one_validation_sample_per_process_and_caps_per_process(tmp_path, caplog):
    plan = TrainingDataPlan(_datalist(tmp_path, 6, 1), batch_size=8, gan_batch_size=2, num_processes=2)
    with pytest.raises(DataCheckError) as err:
        plan.check(["classifier"])
    assert "1 validation labelled records for 2 processes" in str(err.value)
    assert "--nproc_per_node" in str(err.value)
    plan = TrainingDataPlan(_datalist(tmp_path, 6, 2), batch_size=8, gan_batch_size=2, num_processes=2)
    with caplog.at_level(logging.WARNING, logger="her2_monai.data.checks"):
        plan.check(["gan", "classifier"])
    assert plan.batch_size("classifier") == 3  # ceil(6 / 2) per process
    assert "3 training labelled records per process are fewer than --batch_size 8" in caplog.text


def test_a_validation_interval_beyond_the_epochs_is_refused(tmp_path):
    plan = TrainingDataPlan(_datalist(tmp_path, 8, 4), 4, 2, cls_epochs=2, val_interval=3)
    with pytest.raises(DataCheckError, match="would never validate: --val_interval 3 is larger than --cls_epochs 2"):
        plan.check(["classifier"])
    TrainingDataPlan(_datalist(tmp_path, 8, 4), 4, 2, cls_epochs=3, val_interval=3).check(["classifier"])


def test_expected_outputs_must_be_written_by_the_run(tmp_path):
    old = tmp_path / "model.pt"
    old.write_bytes(b"earlier run")
    outputs = ExpectedOutputs({"model": old, "cmgan": tmp_path / "cmgan.pt"}).mark()
    with pytest.raises(DataCheckError) as err:
        outputs.verify(["model", "cmgan"])
    assert "model.pt' was not written by this run" in str(err.value)
    assert "cmgan.pt' does not exist" in str(err.value)
    assert outputs.verify(["model"], resumed="true") == [str(old)]  # a resumed run may keep an earlier best model
    (tmp_path / "cmgan.pt").write_bytes(b"new")
    os.utime(old, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns + 1_000_000))
    assert outputs.verify(["model", "cmgan"]) == [str(old), str(tmp_path / "cmgan.pt")]


def test_num_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert checks.default_num_workers(4) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert checks.default_num_workers(4) == 4


def test_cache_rate_auto_fits_the_caches_in_available_memory(tmp_path, caplog):
    datalist = _datalist(tmp_path, 30, 10)  # 40 records: 80 pair images per stage, in 2 stages
    per_image = 3 * 512 * 512 * 4
    needed = 160 * per_image
    assert choose_cache_rate("auto", datalist, 512, memory=4 * needed) == 1.0
    with caplog.at_level(logging.INFO, logger="her2_monai.data.checks"):
        assert choose_cache_rate("auto", datalist, 512, memory=needed) == 0.5  # half of the memory for caches
    assert "cache_rate auto: 0.50 (caching all 160 images at 512 px" in caplog.text
    assert choose_cache_rate(0.25, datalist, 512) == 0.25 and choose_cache_rate("1", datalist, 512) == 1.0
    with pytest.raises(ValueError, match="cache_rate must be in"):
        choose_cache_rate(1.5, datalist, 512)
    with pytest.raises(ValueError, match="or 'auto'"):
        choose_cache_rate("lots", datalist, 512)


def test_a_stage_that_writes_no_model_fails_the_run(tmp_path):
    """A run list ends by checking its promised files: a stage that wrote nothing fails instead of exiting quietly."""
    from conftest import run_bundle, tiny_overrides

    overrides = tiny_overrides(tmp_path, tmp_path / "cache", **{"selector#output_handlers": [], "tracker": "none"})
    with pytest.raises(RuntimeError) as err:  # MONAI wraps what a config expression raises
        run_bundle("train.json", "train_selector", **overrides)
    cause = err.value
    while cause is not None and not isinstance(cause, DataCheckError):
        cause = cause.__cause__
    assert cause is not None, err.value
    assert f"it promises: '{tmp_path / 'models' / 'selector.pt'}' does not exist" in str(cause)
