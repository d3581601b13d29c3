"""``python -m her2_monai datalist --register``: a folder of unregistered real pairs is registered, then listed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from her2_monai.cli import main
from her2_monai.registration import RegistrationResult, euler_matrix, warp_rgb

SIZE = 192
#: The displacement applied to every IHC: 6 degrees and (10, -8) px.
KNOWN = euler_matrix(6.0, (10.0, -8.0), ((SIZE - 1) / 2, (SIZE - 1) / 2))
#: The real pairs whose cross-stain registration is reliable (tests/test_registration.py, docs/registration.md).
PAIRS = {"00052_test_3+.png": ("bci/HE/test/00052_test_3+.png", "bci/IHC/test/00052_test_3+.png"),
         "15M2102762_15_26_test_2+.png": ("mist/HE/15M2102762_15_26.jpg", "mist/IHC/15M2102762_15_26.jpg")}  # fmt: skip


def _load(path: Path) -> np.ndarray:
    from her2_monai.data.image_reader import read_rgb

    return np.asarray(Image.fromarray(read_rgb(path)).resize((SIZE, SIZE), Image.BILINEAR))


def test_datalist_register_lists_the_registered_copy(shared_data: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "lab"
    for name, (he_rel, ihc_rel) in PAIRS.items():
        he, ihc = _load(shared_data / he_rel), _load(shared_data / ihc_rel)
        displaced = warp_rgb(ihc, RegistrationResult("rigid", KNOWN, KNOWN, 1.0, (SIZE,) * 2, (SIZE,) * 2, (SIZE,) * 2))
        for stain, image in (("HE", he), ("IHC", displaced)):
            (source / stain / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(source / stain / "train" / name)
    output = tmp_path / "datalist.json"
    args = ["datalist", "--dataset_dir", str(source), "--output", str(output), "--val_fraction", "0"]
    # the verdict is conservative (docs/registration.md): keep the pairs it refers to a person, this test checks them
    assert main([*args, "--register", "true", "--register_keep_flagged", "true"]) == 0
    printed = capsys.readouterr().out
    registered = tmp_path / "lab-registered"
    assert f"registered copy written to {registered}" in printed and "registered 2" in printed
    assert (registered / "registration.json").is_file()
    records = json.loads(output.read_text())["training"]
    assert len(records) == 2
    for record in records:
        assert Path(record["he"]).parent == registered / "HE" / "train"
        assert Path(record["ihc"]).parent == registered / "IHC" / "train"
        aligned = np.asarray(Image.open(record["ihc"]).convert("RGB"))
        displaced = np.asarray(Image.open(source / "IHC" / "train" / Path(record["ihc"]).name).convert("RGB"))
        assert aligned.shape == displaced.shape and not np.array_equal(aligned, displaced)
    # The displacement was undone: each pair rotated back by about -6 degrees (the real sections are themselves
    # slightly misaligned, docs/registration.md), and the alignment measures improved.
    pairs = json.loads((registered / "registration.json").read_text())["pairs"]
    for pair in pairs:
        assert pair["status"] == "registered" and abs(pair["angle_deg"] + 6.0) < 1.5, pair["file"]
        q = pair["quality"]
        assert q["ncc_after"] > q["ncc_before"] and q["nmi_after"] > q["nmi_before"], q
    # The registered copy is never overwritten: a second run stops with one line and exit status 2.
    assert main([*args, "--register", "true"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_datalist_register_leaves_out_flagged_pairs_unless_asked(shared_data: Path, tmp_path: Path, capsys) -> None:
    """A pair whose IHC is another section's (nothing to align) is marked and kept out of training by default.

    The trusted pair is an IHC against a displaced copy of itself: one stain, so every start of the search agrees.
    """
    source = tmp_path / "lab"
    ihc = _load(shared_data / PAIRS["00052_test_3+.png"][1])
    other_he = _load(shared_data / PAIRS["15M2102762_15_26_test_2+.png"][0])
    displaced = warp_rgb(ihc, RegistrationResult("rigid", KNOWN, KNOWN, 1.0, (SIZE,) * 2, (SIZE,) * 2, (SIZE,) * 2))
    for name, he in (("good_test_3+.png", ihc), ("wrong_test_3+.png", other_he)):
        for stain, image in (("HE", he), ("IHC", displaced)):
            (source / stain / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(source / stain / "train" / name)
    output = tmp_path / "datalist.json"
    args = ["datalist", "--dataset_dir", str(source), "--output", str(output), "--val_fraction", "0", "--register"]
    args.append("true")
    assert main([*args, "--register_dir", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "registration.json").read_text())
    (flagged,) = summary["flagged"]
    assert Path(flagged["file"]).name == "wrong_test_3+.png" and flagged["verdict"] in ("uncertain", "failed")
    assert flagged["reasons"] and (tmp_path / "a" / "flagged" / "IHC" / "train" / "wrong_test_3+.png").is_file()
    assert "wrong_test_3+.png: left out" in printed, printed
    records = json.loads(output.read_text())["training"]
    assert [Path(r["he"]).name for r in records] == ["good_test_3+.png"]
    # --register_keep_flagged true keeps it (and still lists it)
    assert main([*args, "--register_dir", str(tmp_path / "b"), "--register_keep_flagged", "true"]) == 0
    assert "wrong_test_3+.png: kept" in capsys.readouterr().out
    assert len(json.loads(output.read_text())["training"]) == 2
