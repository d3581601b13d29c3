"""The GPU smoke script's tiny CPU mode: synthetic 1024 px BCI-layout data, the three stages, a report per stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from PIL import Image

pytestmark = pytest.mark.slow

#: Toy sizes for the stages; the input files stay 1024 px JPEG under .png, read and resized like BCI's.
TINY = ["image_size=32", "gan_crop_size=0", "gan_ngf=8", "gan_n_blocks=1", "gan_ndf=8", "shared_backbone=resnet10",
        "specific_backbone=resnet10", "selector_batch_size=4", "selector_image_size=32", "selector_crop_size=32",
        "selector_per_class=1", 'selector_labs=["A"]', "batch_size=4"]  # fmt: skip


def test_cpu_mode_trains_every_stage_and_reports_speed_and_memory(tmp_path):
    out = tmp_path / "speed.json"
    command = [
        sys.executable, "benchmarks/bci_profile_speed.py", "--device", "cpu", "--iterations", "5", "--amp", "off",
        "--pairs_per_class", "2", "--work", str(tmp_path), "--json", str(out), "--set", *TINY,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["iterations"] == 5 and report["warmup"] == 1
    stages = report["runs"]["amp off"]
    assert set(stages) == {"selector", "gan", "classifier"}
    for stage, row in stages.items():
        assert row["timed_iterations"] == 4, stage  # 5 iterations, the first untimed
        assert row["samples_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["images_per_s"] == pytest.approx(row["samples_per_s"] * (1 if stage == "selector" else 2))
    # 8 training pairs minus 4 for validation leave 4: the classifier batch of 4 fits, the CM-GAN keeps its 2.
    assert stages["gan"]["batch_size"] == 2 and stages["classifier"]["batch_size"] == 4
    assert "samples/s" in done.stdout and "peak RSS MB" in done.stdout
    he = tmp_path / "bci_like" / "HE" / "train" / "00001_train_0.png"
    with Image.open(he) as image:  # BCI's format: JPEG bytes under a .png name, 1024 px
        assert image.format == "JPEG" and image.size == (1024, 1024)
