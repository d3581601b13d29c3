"""The branch selector on real images of other labs at other magnifications (issue: H&E called IHC at 0.5x), the
views it is evaluated on, the tissue-layout augmentation it is trained with, and ``stain_uncertain`` referral."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_bundle

from her2_monai.inference import prediction_result
from her2_monai.inference.predictor import STAIN_UNCERTAIN_BELOW
from her2_monai.metrics.selector_transfer import scaled_views, selector_view_accuracy
from her2_monai.networks.factory import frozen_selector
from her2_monai.transforms import RandGlassAndFatd
from her2_monai.transforms.tissue_layout import glass_colour

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = (1.0, 0.5, 0.25)
CROPS = (96, 128, 256)
#: Issue 10 item 5: at least 99% right at every scale, for every crop of at least 96 px. Measured 2026-11-29 with
#: train.json's selector (stain-hue features only), seeds 0 and 1: 100% in every cell.
TARGET = 0.99
#: The selector must not reach the target by doubting: at most this share of a cell's views may have a top
#: probability below the ``stain_uncertain`` threshold (measured: at most 3 of 81 views, 3.7%).
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


def _real_images() -> list[tuple[str, np.ndarray, int]]:
    from skimage import data as skdata

    from her2_monai.data.image_reader import read_rgb

    items = []
    sources = {"bci/HE/test": 0, "bci/IHC/test": 1, "mist/HE": 0, "mist/IHC": 1, "stain_reference": 0}
    for folder, stain in sources.items():
        files = sorted(f for f in (SHARED_DATA / folder).iterdir() if f.suffix in (".png", ".jpg"))
        items += [(f"{folder}/{f.name}", read_rgb(f), stain) for f in files]
    items.append(("skimage immunohistochemistry", skdata.immunohistochemistry(), 1))
    return items


@pytest.fixture(scope="module")
def trained_selector(tmp_path_factory):
    """The selector trained once by the bundle's stage 0 with train.json's own selector settings."""
    root = tmp_path_factory.mktemp("selector")
    run_bundle("train.json", "train_selector", bundle_root=str(root), tracker="none", demo_cache_dir=str(root / "c"))
    return frozen_selector(Path(root) / "models" / "selector.pt")


@pytest.fixture(scope="module")
def real_view_scores(trained_selector) -> dict:
    """The trained selector's accuracy on every real image at each scale and crop size."""
    if not (SHARED_DATA / "bci").is_dir() or not (SHARED_DATA / "mist").is_dir():
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA}")
    images = _real_images()
    assert len(images) == 22
    views = []
    for name, image, stain in images:
        views += scaled_views(name, image, stain, SCALES, CROPS, per_axis=2)[0]
    scores = selector_view_accuracy(trained_selector, views, uncertain_below=STAIN_UNCERTAIN_BELOW)
    assert set(scores) == {(s, c) for s in SCALES for c in CROPS}
    return scores


@pytest.mark.slow
def test_selector_holds_on_real_images_at_three_scales_and_several_crops(real_view_scores) -> None:
    failing = {key: (cell.accuracy, cell.wrong) for key, cell in real_view_scores.items() if cell.accuracy < TARGET}
    assert not failing, failing


@pytest.mark.slow
def test_selector_on_real_images_is_sure_of_most_views(real_view_scores) -> None:
    unsure = {key: cell.uncertain / cell.total for key, cell in real_view_scores.items()}
    assert all(share <= MAX_UNSURE for share in unsure.values()), unsure
    # Any mistake left is H&E called IHC: no IHC view of any lab or scale is called H&E.
    wrong = [view for cell in real_view_scores.values() for view in cell.wrong]
    assert all("/IHC/" not in name and "immunohistochemistry" not in name for name, *_ in wrong), wrong
