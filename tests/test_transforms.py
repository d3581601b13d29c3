from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bundle_component
from PIL import Image

from her2_monai.data.demo import DemoPairGenerator
from her2_monai.transforms import (
    LabAppearanceBatch,
    LoadStainsd,
    RandLabAppearanced,
    RandModalityDropoutd,
    RandStainJitterd,
)


def stain_pipeline(size: int, **overrides):
    """The bundle's evaluation preprocessing (train.json ``stain_preprocessing``) at ``size`` pixels."""
    return bundle_component("train.json", "stain_preprocessing", image_size=size, **overrides)


@pytest.fixture()
def pair_files(tmp_path):
    he, ihc = DemoPairGenerator(64).render(3, seed=0)
    Image.fromarray(he).save(tmp_path / "he.png")
    Image.fromarray(ihc).save(tmp_path / "ihc.png")
    return str(tmp_path / "he.png"), str(tmp_path / "ihc.png")


def test_output_contract_with_missing_stain(pair_files):
    he, ihc = pair_files
    out = stain_pipeline(32)({"he": he, "ihc": None, "label": 2})
    assert out["he"].shape == (3, 32, 32) and out["ihc"].shape == (3, 32, 32)
    assert -1.0 <= float(out["he"].min()) and float(out["he"].max()) <= 1.0
    assert torch.equal(torch.as_tensor(out["ihc"]), torch.zeros(3, 32, 32))
    assert out["mask"].tolist() == [1.0, 0.0] and int(out["label"]) == 2
    unlabelled = stain_pipeline(32)({"he": None, "ihc": ihc, "label": None})
    assert unlabelled["mask"].tolist() == [0.0, 1.0] and int(unlabelled["label"]) == -1
    with pytest.raises(ValueError, match="record 'x' has none of the stains"):
        LoadStainsd()({"he": None, "ihc": None, "id": "x"})


def test_paired_augmentation_keeps_stains_registered(pair_files):
    he, _ = pair_files
    # The same image as both stains: any spatial disagreement would show as a difference.
    # The CM-GAN's training chain of the bundle: random crop, flips and rotations drawn once for both stains.
    pipeline = bundle_component("train.json", "gan#preprocessing", image_size=48, gan_crop_size=32)
    reference = stain_pipeline(48)({"he": he, "ihc": he})["he"][:, 8:40, 8:40]
    changed = 0
    for seed in range(12):
        pipeline.set_random_state(seed)
        out = pipeline({"he": he, "ihc": he, "label": 0})
        assert torch.equal(torch.as_tensor(out["he"]), torch.as_tensor(out["ihc"]))
        changed += not torch.allclose(torch.as_tensor(out["he"]), torch.as_tensor(reference))
    assert changed >= 6  # the augmentation really moved pixels


def test_colour_jitter_is_independent_per_stain():
    image = torch.full((3, 8, 8), 120.0)
    out = RandStainJitterd(prob=1.0, scale=0.2).set_random_state(0)({"he": image, "ihc": image.clone()})
    assert not torch.allclose(out["he"], out["ihc"])
    assert not torch.allclose(out["he"], image)
    white = RandStainJitterd(prob=1.0, scale=0.2, shift=0.0).set_random_state(0)({"he": torch.full((3, 4, 4), 255.0)})
    assert torch.allclose(white["he"], torch.full((3, 4, 4), 255.0), atol=1e-3)  # glass stays white


def test_modality_dropout_hides_exactly_one_stain_of_dual_records(pair_files):
    he, ihc = pair_files
    dropout = RandModalityDropoutd(prob=1.0)
    dropout.set_random_state(0)
    seen = set()
    for _ in range(20):
        out = dropout(LoadStainsd()({"he": he, "ihc": ihc}))
        assert out["mask"].sum() == 1.0
        kept = "he" if out["mask"][0] else "ihc"
        assert kept in out and ("ihc" if kept == "he" else "he") not in out
        seen.add(kept)
    assert seen == {"he", "ihc"}
    single = dropout(LoadStainsd()({"he": he, "ihc": None}))
    assert single["mask"].tolist() == [1.0, 0.0]  # never drops the only stain
    with pytest.raises(ValueError, match="drop_weights"):
        RandModalityDropoutd(drop_weights=[1.0])


def test_rgb_arrays_are_accepted_and_checked():
    array = np.zeros((16, 16, 3), np.uint8)
    assert LoadStainsd()({"he": array})["he"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"'he' must be a file path or an \(H, W, 3\) RGB array"):
        LoadStainsd()({"he": np.zeros((16, 16))})


def test_classifier_training_chain_hides_stains_and_jitters_each_stain_alone(pair_files):
    he, _ = pair_files
    pipeline = bundle_component("train.json", "train#preprocessing", image_size=32, modality_dropout=1.0)
    pipeline.set_random_state(0)
    masks = {tuple(pipeline({"he": he, "ihc": he, "label": 1})["mask"].tolist()) for _ in range(12)}
    assert masks == {(1.0, 0.0), (0.0, 1.0)}  # modality dropout at 1.0 always hides exactly one stain


def test_lab_appearance_is_bounded_seeded_and_off_at_zero():
    image = torch.rand(3, 16, 16) * 230 + 12
    assert torch.equal(RandLabAppearanced(strength=0.0)({"image": image})["image"], image)
    a = RandLabAppearanced().set_random_state(1)({"image": image})["image"]
    b = RandLabAppearanced().set_random_state(1)({"image": image})["image"]
    assert torch.equal(a, b) and a.shape == image.shape
    assert a.min() >= 0 and a.max() <= 255 and (a - image).abs().mean() > 2.5
    with pytest.raises(ValueError, match="strength"):
        RandLabAppearanced(strength=-1)
    # The batch version (the selector trainer's prepare_batch) is seeded, returns [-1, 1] and keeps the labels.
    batch = {"image": image[None].repeat(4, 1, 1, 1), "label": torch.tensor([0, 1, 0, 1])}
    first, labels = LabAppearanceBatch(seed=5)(batch)
    second, _ = LabAppearanceBatch(seed=5)(batch)
    assert torch.equal(first, second) and torch.equal(labels, batch["label"])
    assert first.min() >= -1 and first.max() <= 1 and not torch.allclose(first[0], first[1])
