"""Cohort scoring (``python -m her2_monai wsi --slides``): the table, failures, skip/resume, kill -9, torchrun.

The slides are small tiled TIFFs made from real BCI H&E patches (a few 128 px tiles each) and a text file named
``.svs``; the model is the session's tiny trained bundle. Comparisons between runs pin float32 (tests/conftest.py).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO_ROOT

from her2_monai.cli import main
from her2_monai.constants import CLASS_NAMES
from her2_monai.data.image_reader import read_rgb
from her2_monai.wsi.cohort import DONE_FILE, CohortError, balance_by_size, list_slides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = REPO_ROOT / "bundle" / "configs" / "inference.json"
SCORED = ("slide_a", "slide_b", "slide_c")


def _mosaic(patches: list[np.ndarray], columns: int) -> np.ndarray:
    """Patches (256 px) on white glass with a 64 px margin, ``columns`` per row."""
    rows = -(-len(patches) // columns)
    canvas = np.full((rows * 256 + 128, columns * 256 + 128, 3), 243, np.uint8)
    for k, patch in enumerate(patches):
        y, x = 64 + (k // columns) * 256, 64 + (k % columns) * 256
        canvas[y : y + 256, x : x + 256] = patch
    return canvas


@pytest.fixture(scope="module")
def cohort(shared_data: Path, tmp_path_factory) -> Path:
    """A folder of three tiled TIFF slides of real BCI patches (1, 2 and 3 patches), a blank one (glass only) and an
    unreadable '.svs'."""
    from PIL import Image

    names = sorted(p.name for p in (shared_data / "bci" / "HE" / "test").iterdir())[:6]
    patches = [
        np.asarray(Image.fromarray(read_rgb(shared_data / "bci" / "HE" / "test" / n)).resize((256, 256))) for n in names
    ]
    folder = tmp_path_factory.mktemp("cohort")
    for name, count in zip(SCORED, (1, 2, 3)):
        image = _mosaic(patches[:count] if name != "slide_c" else patches[3:6], columns=count)
        tifffile.imwrite(folder / f"{name}.tif", image, tile=(64, 64), photometric="rgb")
    tifffile.imwrite(folder / "blank.tif", np.full((256, 256, 3), 243, np.uint8), tile=(64, 64), photometric="rgb")
    (folder / "broken.svs").write_text("this is a text file, not a slide\n")
    (folder / "notes.txt").write_text("not listed: not a slide extension\n")
    return folder


def _args(slides: Path, output: Path, bundle: Path, *extra: str) -> list[str]:
    args = ["wsi", "--slides", str(slides), "--output", str(output), "--bundle", str(bundle)]
    return [
        *args,
        "--config_file",
        str(CONFIG),
        "--tile_size",
        "128",
        "--batch_size",
        "4",
        "--progress",
        "false",
        *extra,
    ]


def _table(output: Path) -> list[dict[str, str]]:
    with open(output / "cohort.csv") as stream:
        return list(csv.DictReader(stream))


def _tile_scores(folder: Path) -> tuple[str, ...]:
    if not (folder / "tiles.csv").is_file():
        return ()
    with open(folder / "tiles.csv") as stream:
        return tuple(f"{r['tile']}:{r['score']}:{r['refer']}" for r in csv.DictReader(stream))


def _results(output: Path) -> dict[str, tuple]:
    """What must not depend on how the run went: per slide, the status, call, refer flag, tile counts and each
    tile's score and refer flag (the tiny demo model refers most tiles, so the calls alone would say little)."""
    return {
        r["slide_id"]: (r["status"], r["call"], r["refer"], r["tissue_tiles"], r["referred_tiles"], r["refused_tiles"])
        + tuple(r[f"tiles_{n}"] for n in CLASS_NAMES)
        + _tile_scores(output / r["slide_id"])
        for r in _table(output)
    }


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def _fp32_env() -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HER2_CPU_PRECISION": "fp32"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def reference(cohort: Path, trained_bundle: Path, tmp_path_factory) -> Path:
    """An uninterrupted single-process run in float32 (the table every other run must reproduce)."""
    output = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HER2_CPU_PRECISION", "fp32")
        assert main(_args(cohort, output, trained_bundle)) == 1  # two slides fail
    return output


# ---------------------------------------------------------------------------------------------------- listing, split


def test_listing_a_folder_and_a_csv(cohort: Path, tmp_path: Path) -> None:
    slides = list_slides(cohort)
    assert [s.slide_id for s in slides] == ["blank", "broken", *SCORED]  # notes.txt is not a slide extension
    assert slides[2].size_bytes == (cohort / "slide_a.tif").stat().st_size
    table = tmp_path / "lists" / "cohort.csv"
    table.parent.mkdir()
    absolute = cohort / "slide_b.tif"
    rows = f"slide,slide_id,extra\n../{cohort.name}/slide_a.tif,first,x\n{absolute},,y\n"
    (tmp_path / cohort.name).symlink_to(cohort)
    table.write_text(rows)
    listed = list_slides(table)
    assert [(s.slide_id, s.path.resolve()) for s in listed] == [
        ("first", (cohort / "slide_a.tif").resolve()),  # relative to the CSV's folder
        ("slide_b", absolute),
    ]
    table.write_text("path\nslide_a.tif\n")
    with pytest.raises(CohortError, match=r"no 'slide' column \(its columns: \['path'\]\)"):
        list_slides(table)
    table.write_text("slide\nmissing.svs\n")
    with pytest.raises(CohortError, match=r"line 2: slide '.*missing.svs' not found"):
        list_slides(table)
    table.write_text(f"slide,slide_id\n{absolute},same\n{cohort / 'slide_c.tif'},same\n")
    with pytest.raises(CohortError, match="would share the output folder 'same'"):
        list_slides(table)
    with pytest.raises(CohortError, match="not found"):
        list_slides(tmp_path / "nothing")


def test_balance_puts_the_largest_first_onto_the_least_loaded_rank() -> None:
    # 9 -> rank 0; 5, 3, 3 -> rank 1 (5, 8, 11); 1 -> rank 0 (10 < 11)
    assert balance_by_size([5, 1, 9, 3, 3], 2) == [[1, 2], [0, 3, 4]]
    shares = balance_by_size([10, 7, 6, 5, 4, 2], 3)
    assert sorted(i for s in shares for i in s) == list(range(6))
    loads = [sum([10, 7, 6, 5, 4, 2][i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= 2
    assert balance_by_size([1, 2], 4) == [[1], [0], [], []]


# ------------------------------------------------------------------------------------------------ table and resume


def test_cohort_table_failure_skip_and_half_written_redo(
    cohort: Path, trained_bundle: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out"
    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert main([*_args(cohort, output, trained_bundle), "--tracking_uri", tracking, "--run_name", "cohort-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cohort: 3 of 5 slides scored, 2 failed (blank, broken)")
    rows = {r["slide_id"]: r for r in _table(output)}
    assert list(rows) == ["blank", "broken", *SCORED]  # every slide, in listing order
    broken = rows["broken"]
    assert broken["status"] == "failed" and "SlideOpenError" in broken["reason"] and "broken.svs" in broken["reason"]
    assert broken["call"] == "" and broken["output"] == "" and not (output / "broken").exists()
    # Glass only: written (the heatmap shows why), failed for want of tissue, and done (not retried).
    blank = rows["blank"]
    assert blank["status"] == "failed" and blank["reason"].startswith("no tissue") and blank["tissue_tiles"] == "0"
    assert (output / "blank" / DONE_FILE).is_file() and (output / "blank" / "heatmap.png").is_file()
    for name in SCORED:
        row = rows[name]
        summary = json.loads((output / name / "slide.json").read_text())
        assert row["status"] == "scored" and row["reader"] == "tifffile" and row["done_in_this_run"] == "True"
        assert row["call"] == (summary["score"] or "") and int(row["tissue_tiles"]) == summary["tissue_tiles"] > 0
        assert {n: int(row[f"tiles_{n}"]) for n in CLASS_NAMES} == summary["tile_counts"]
        assert float(row["seconds"]) > 0
        assert {p.name for p in (output / name).iterdir()} == {
            "slide.json", "tiles.csv", "tiles.geojson", "heatmap.png", DONE_FILE,
        }  # fmt: skip
    assert int(rows["slide_c"]["tissue_tiles"]) > int(rows["slide_a"]["tissue_tiles"])
    run = json.loads((output / "cohort.json").read_text())["run"]
    assert (run["slides"], run["scored"], run["failed"], run["done_in_this_run"]) == (5, 3, 2, 5)
    assert len(run["model_sha256"]) == 64 and run["settings"]["tile_size"] == 128
    assert not [p for p in output.iterdir() if p.name.endswith((".partial", ".stale"))]
    # MLflow: one run with the counts, the settings and the table.
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=tracking)
    (logged,) = client.search_runs([client.get_experiment_by_name("her2-monai").experiment_id])
    assert logged.info.run_name == "cohort-1" and logged.data.tags["her2_monai.kind"] == "wsi_cohort"
    assert logged.data.metrics["slides"] == 5 and logged.data.metrics["failed"] == 2
    assert logged.data.params["tile_size"] == "128" and logged.data.params["model_sha256"] == run["model_sha256"]
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"cohort.csv", "cohort.json"}

    # Second run: the four done slides are skipped (their folders untouched), the unreadable one is tried again.
    before = {name: _mtimes(output / name) for name in (*SCORED, "blank")}
    assert main(_args(cohort, output, trained_bundle)) == 1
    assert "2 failed (blank, broken)" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {name: _mtimes(output / name) for name in (*SCORED, "blank")} == before
    rows = {r["slide_id"]: r for r in _table(output)}
    assert {k: r["done_in_this_run"] for k, r in rows.items()} == {
        "blank": "False", "broken": "True", "slide_a": "False", "slide_b": "False", "slide_c": "False",
    }  # fmt: skip
    assert json.loads((output / "cohort.json").read_text())["run"]["skipped_done_earlier"] == 4
    first = _results(output)

    # A half-written slide folder (no completion marker, a file missing) is scored again, the others skipped.
    (output / "slide_b" / DONE_FILE).unlink()
    (output / "slide_b" / "heatmap.png").unlink()
    assert main(_args(cohort, output, trained_bundle)) == 1
    rows = {r["slide_id"]: r for r in _table(output)}
    assert rows["slide_b"]["done_in_this_run"] == "True" and rows["slide_a"]["done_in_this_run"] == "False"
    assert (output / "slide_b" / "heatmap.png").is_file() and (output / "slide_b" / DONE_FILE).is_file()
    assert _results(output) == first

    # Other settings (or another model) than the folders were made with: refused, nothing changed.
    before = {name: _mtimes(output / name) for name in SCORED}
    assert main([*_args(cohort, output, trained_bundle), "--min_tissue", "0.9"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "4 slide folder(s)" in last and "other settings" in last and "min_tissue 0.5 there, 0.9 now" in last
    assert {name: _mtimes(output / name) for name in SCORED} == before
    # A folder made with another model (its recorded digest differs): refused too, naming both digests.
    marker = json.loads((output / "slide_c" / DONE_FILE).read_text())
    marker["fingerprint"]["model_sha256"] = "0" * 64
    (output / "slide_c" / DONE_FILE).write_text(json.dumps(marker))
    assert main(_args(cohort, output, trained_bundle)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "1 slide folder(s)" in last
        and f"'{output / 'slide_c'}'" in last
        and "model SHA-256 000000000000... there" in last
    )
    assert {name: _mtimes(output / name) for name in ("slide_a", "slide_b")} == {
        k: before[k] for k in ("slide_a", "slide_b")
    }


# ------------------------------------------------------------------------------------------ kill -9 and torchrun

_KILLABLE = """
import sys, time
from pathlib import Path
import her2_monai.wsi.outputs as outputs
from her2_monai.cli import main

marker, real, calls = Path(sys.argv[1]), outputs.save_heatmap, []

def stop_on_the_second_slide(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # blank and slide_a are done; slide_b has tiles.csv and tiles.geojson, no heatmap yet
        marker.write_text("stopped")
        time.sleep(600)
    return real(*args, **kwargs)

outputs.save_heatmap = stop_on_the_second_slide
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_mid_cohort_then_resume_gives_the_uninterrupted_table(
    cohort: Path, trained_bundle: Path, reference: Path, tmp_path: Path
) -> None:
    output, marker = tmp_path / "out", tmp_path / "stopped"
    command = [sys.executable, "-c", _KILLABLE, str(marker), *_args(cohort, output, trained_bundle)]
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=_fp32_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), f"the child did not reach slide_b:\n{child.communicate()[0].decode()[-3000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # Killed mid-slide: two slide folders complete, slide_b only as a temporary folder, no table yet.
    done = sorted(p.name for p in output.iterdir() if (p / DONE_FILE).is_file())
    partial = [p for p in output.iterdir() if p.name.endswith(".partial")]
    assert done == ["blank", "slide_a"] and len(partial) == 1 and partial[0].name.startswith(".slide_b.")
    assert (partial[0] / "tiles.csv").is_file() and not (partial[0] / "heatmap.png").exists()
    assert not (output / "cohort.csv").exists()
    finished = subprocess.run(
        [sys.executable, "-m", "her2_monai", *_args(cohort, output, trained_bundle)],
        cwd=REPO_ROOT, env=_fp32_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert finished.stderr.strip().splitlines()[-1].startswith("error: cohort: 3 of 5 slides scored, 2 failed")
    assert not [p for p in output.iterdir() if p.name.endswith((".partial", ".stale"))]
    rows = {r["slide_id"]: r["done_in_this_run"] for r in _table(output)}
    assert rows == {"blank": "False", "broken": "True", "slide_a": "False", "slide_b": "True", "slide_c": "True"}
    assert _results(output) == _results(reference)


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_table(
    cohort: Path, trained_bundle: Path, reference: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "her2_monai", *_args(cohort, output, trained_bundle)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_fp32_env(), capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-4000:]  # a slide failed: rank 0 exits 1, torchrun reports it
    assert "error: cohort: 3 of 5 slides scored, 2 failed (blank, broken)" in log
    assert _results(output) == _results(reference)
    table = _table(output)
    assert {r["rank"] for r in table if r["status"] == "scored"} == {"0", "1"}  # both ranks scored slides
    assert json.loads((output / "cohort.json").read_text())["run"]["world_size"] == 2
    # Rank 0's refusal (folders of other settings) reaches rank 1 too: both stop with it, none waits for the other.
    command[command.index("--progress")] = "--min_tissue"
    command[command.index("--min_tissue") + 1] = "0.9"
    refused = subprocess.run(command, cwd=REPO_ROOT, env=_fp32_env(), capture_output=True, text=True, timeout=300)
    log = refused.stdout + refused.stderr
    assert refused.returncode != 0 and log.count("error: 4 slide folder(s)") == 2, log[-4000:]
