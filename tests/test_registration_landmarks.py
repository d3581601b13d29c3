"""Landmark files and the target registration error (TRE): reading, mapping, the register command and the benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from registration_helpers import similarity, stains
from scipy import ndimage

from her2_monai.registration import PairRegistration, RegistrationResult, warp_rgb
from her2_monai.registration.landmarks import landmark_errors, landmark_summary, read_landmarks

ROOT = Path(__file__).resolve().parents[1]
SIZE = 192


def _pair(seed: int = 5, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E-like and IHC-like rendering of the same blob 'tissue'."""
    tissue = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 3.0)
    return stains((tissue - tissue.min()) / np.ptp(tissue))


def _displace(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    shape = image.shape[:2]
    return warp_rgb(image, RegistrationResult("affine", matrix, matrix, 1.0, shape, shape, shape))


def _write_anhir(path: Path, points: np.ndarray) -> Path:
    """The ImageJ / ANHIR layout: an unnamed index column, then X and Y."""
    lines = [",X,Y"] + [f"{i},{x:.3f},{y:.3f}" for i, (x, y) in enumerate(points)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _landmarks(matrix: np.ndarray, count: int = 12, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """H&E points inside the central part, and where the displaced IHC shows the same places: ``D^-1 p``."""
    he = np.random.default_rng(1).uniform(0.25 * size, 0.75 * size, (count, 2))
    moved = (np.linalg.inv(matrix) @ np.c_[he, np.ones(count)].T)[:2].T
    return he, moved


def test_read_landmarks_layouts_and_errors(tmp_path):
    points = np.array([[10.5, 20.0], [30.0, 40.25], [5.0, 6.0]])
    assert np.allclose(read_landmarks(_write_anhir(tmp_path / "anhir.csv", points)), points)
    (tmp_path / "named.csv").write_text("Y,label,X\n20,a,10.5\n40.25,b,30\n6,c,5\n")  # columns found by name
    assert np.allclose(read_landmarks(tmp_path / "named.csv"), points)
    (tmp_path / "bare.csv").write_text("10.5,20\n30,40.25\n5,6\n")
    assert np.allclose(read_landmarks(tmp_path / "bare.csv"), points)
    (tmp_path / "indexed.csv").write_text("0,10.5,20\n1,30,40.25\n2,5,6\n")
    assert np.allclose(read_landmarks(tmp_path / "indexed.csv"), points)

    with pytest.raises(ValueError, match="missing.csv: landmark file not found"):
        read_landmarks(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(ValueError, match="empty.csv: no landmarks"):
        read_landmarks(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(",X,Y\n")
    with pytest.raises(ValueError, match="header.csv: no landmarks"):
        read_landmarks(tmp_path / "header.csv")
    (tmp_path / "nocols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="nocols.csv: header .* has no X and Y columns"):
        read_landmarks(tmp_path / "nocols.csv")
    (tmp_path / "text.csv").write_text(",X,Y\n0,1,2\n1,3,four\n")
    with pytest.raises(ValueError, match="text.csv: row 3, column Y: expected a number, got 'four'"):
        read_landmarks(tmp_path / "text.csv")
    (tmp_path / "wide.csv").write_text("1,2,3,4\n")
    with pytest.raises(ValueError, match="wide.csv: a header-less landmark file needs 2"):
        read_landmarks(tmp_path / "wide.csv")
    (tmp_path / "short.csv").write_text(",X,Y\n0,1\n")
    with pytest.raises(ValueError, match="short.csv: row 2 has 2 columns"):
        read_landmarks(tmp_path / "short.csv")


def test_map_points_matches_the_dense_coordinates_with_a_bspline():
    """``map_points`` is the same transform ``coordinates()`` (and so ``warp_rgb``) applies, B-spline included."""
    rng = np.random.default_rng(0)
    matrix = np.array([[0.98, 0.05, 3.0], [-0.04, 1.01, -2.0], [0, 0, 1.0]])
    displacement = rng.normal(scale=2.0, size=(2, 9, 9))
    result = RegistrationResult("affine", matrix, matrix, 0.5, (128, 128), (128, 128), (64, 64), displacement, 8)
    dense = result.coordinates()
    points = np.array([[0.0, 0.0], [17.0, 90.0], [127.0, 64.0], [50.0, 3.0]])
    expected = np.stack([dense[:, int(y), int(x)] for x, y in points])
    assert np.allclose(result.map_points(points), expected, atol=1e-9)
    plain = RegistrationResult("affine", matrix, matrix, 0.5, (128, 128), (128, 128), (64, 64))
    assert np.allclose(plain.map_points(points), (matrix @ np.c_[points, np.ones(4)].T)[:2].T)


def test_landmark_errors_of_a_registration_and_of_the_identity():
    he, ihc = _pair()
    known = similarity(7.0, 1.0, (9.0, -6.0), SIZE)
    he_points, ihc_points = _landmarks(known)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PairRegistration(max_side=SIZE)(he, _displace(ihc, known))
    errors = landmark_errors(result, he_points, ihc_points)
    before = np.linalg.norm(he_points - ihc_points, axis=1)
    assert errors.shape == (12,) and np.median(errors) < 1.0 and np.median(before) > 10.0, (errors, before)
    summary = landmark_summary(errors, before, he.shape)
    assert summary["points"] == 12 and len(summary["tre_px"]) == 12
    assert summary["median_px"] == pytest.approx(np.median(errors))
    assert summary["median_rtre"] == pytest.approx(np.median(errors) / math.hypot(SIZE, SIZE))
    with pytest.raises(ValueError, match=r"same N .* got \(12, 2\) for the H&E and \(11, 2\)"):
        landmark_errors(result, he_points, ihc_points[:11])


def test_register_command_reports_the_landmark_error(tmp_path, capsys):
    from her2_monai.cli import main

    he, ihc = _pair()
    known = similarity(-6.0, 1.0, (-8.0, 7.0), SIZE)
    he_points, ihc_points = _landmarks(known)
    Image.fromarray(he).save(tmp_path / "he.png")
    Image.fromarray(_displace(ihc, known)).save(tmp_path / "ihc.png")
    he_csv, ihc_csv = _write_anhir(tmp_path / "he.csv", he_points), _write_anhir(tmp_path / "ihc.csv", ihc_points)
    out = tmp_path / "out"
    args = ["register", "--he", str(tmp_path / "he.png"), "--ihc", str(tmp_path / "ihc.png"), "--output", str(out)]
    assert main([*args, "--he_landmarks", str(he_csv), "--ihc_landmarks", str(ihc_csv)]) == 0
    assert "landmarks: 12 points, TRE median" in capsys.readouterr().out
    marks = json.loads((out / "registration.json").read_text())["landmarks"]
    assert marks["points"] == 12 and marks["median_px"] < 1.0 and marks["median_before_px"] > 10.0, marks
    assert marks["files"] == {"he": str(he_csv), "ihc": str(ihc_csv)}

    # bad landmark input is refused before any registration runs, naming the file
    _write_anhir(tmp_path / "fewer.csv", ihc_points[:5])
    assert main([*args, "--he_landmarks", str(he_csv), "--ihc_landmarks", str(tmp_path / "fewer.csv")]) == 2
    assert "he.csv has 12 landmarks but" in capsys.readouterr().err
    assert main([*args, "--he_landmarks", str(he_csv)]) == 2
    assert "--he_landmarks and --ihc_landmarks go together" in capsys.readouterr().err


def test_landmark_benchmark_scores_a_folder_of_cases(tmp_path):
    """``benchmarks/registration_landmarks.py`` on two synthetic cases (one with landmarks at twice the image's scale,
    as exported from a higher level), and its refusal of a folder without a usable case."""
    root = tmp_path / "cases"
    for name, seed, scale in (("a", 5, 1.0), ("b", 8, 2.0)):
        case = root / name
        case.mkdir(parents=True)
        he, ihc = _pair(seed)
        known = similarity(5.0, 1.0, (6.0, -9.0), SIZE)
        he_points, ihc_points = _landmarks(known)
        Image.fromarray(he).save(case / "he.png")
        Image.fromarray(_displace(ihc, known)).save(case / "ihc.jpg", quality=95)
        _write_anhir(case / "he.csv", he_points * scale)
        _write_anhir(case / "ihc.csv", ihc_points * scale)
        if scale != 1.0:
            (case / "case.json").write_text(json.dumps({"landmark_scale": 1 / scale, "mpp": 0.5}))
    script = ROOT / "benchmarks" / "registration_landmarks.py"
    out = tmp_path / "tre.json"
    done = subprocess.run(
        [sys.executable, str(script), str(root), "--max_side", str(SIZE), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["a", "b"]
    for row in rows:
        assert row["median_px"] < 1.5 and row["median_before_px"] > 10.0, row
        assert row["verdict"] in ("registered", "uncertain", "failed")
    assert "median TRE < 5 px: 2 of 2" in done.stdout
    assert rows[1]["median_um"] == pytest.approx(0.5 * rows[1]["median_px"]) and "median_um" not in rows[0]

    (root / "c").mkdir()
    (root / "c" / "he.png").write_bytes((root / "a" / "he.png").read_bytes())
    done = subprocess.run([sys.executable, str(script), str(root / "c")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no case" in done.stderr, done.stderr
