"""Tests for the branch selector (H&E vs IHC), stain features, the stain-batch routing rules and the selector stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_bundle, tiny_overrides
from skimage.color import rgb2hed

from her2_monai.constants import DUAL, HE_ONLY, IHC_ONLY
from her2_monai.networks.factory import frozen_selector
from her2_monai.networks.selector import BranchSelector
from her2_monai.stain_batch import (
    assign_unknown_stains,
    check_mask,
    check_stain_inputs,
    route_unknown_stains,
    scenario_id,
    scenario_ids,
)
from her2_monai.stain_features import HUE_BINS, RUIFROK_HED_VECTORS, StainFeatureExtractor, lab_appearance
from her2_monai.transforms import LabAppearanceBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _stain_image(conc: tuple[float, float, float], size: int = 16) -> torch.Tensor:
    """A uniform ``(1, 3, size, size)`` image in [-1, 1] made by Beer-Lambert from H, E, DAB concentrations."""
    vectors = torch.tensor(RUIFROK_HED_VECTORS)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    od = torch.tensor(conc) @ vectors
    rgb = torch.exp(-od).view(1, 3, 1, 1).expand(1, 3, size, size)
    return rgb * 2 - 1


def test_selector_shapes_and_sizes() -> None:
    torch.manual_seed(0)
    for kwargs in ({}, {"use_stain_features": False}, {"cnn_input": "rgb"}):
        model = BranchSelector(**kwargs).eval()
        for size in (32, 48, 64):
            x = torch.rand(2, 3, size, size) * 2 - 1
            assert model(x).shape == (2, 2)
            pred = model.predict_stain(x)
            assert pred.shape == (2,) and pred.dtype == torch.long and set(pred.tolist()) <= {0, 1}


def test_selector_rejects_bad_input() -> None:
    model = BranchSelector().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="cnn_input"):
        BranchSelector(cnn_input="hsv")
    with pytest.raises(ValueError, match="branch_dropout"):
        BranchSelector(branch_dropout=1.0)


def test_selector_jit_trace_matches_eager() -> None:
    torch.manual_seed(0)
    model = BranchSelector().eval()
    example = torch.rand(2, 3, 64, 64) * 2 - 1
    traced = torch.jit.trace(model, example)
    other = torch.rand(3, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(traced(other), model(other))


def test_stain_concentrations_match_skimage_rgb2hed() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.05, 1.0, size=(8, 8, 3))
    extractor = StainFeatureExtractor(white_balance=False, eps=1e-6)
    x = torch.from_numpy(rgb).float().permute(2, 0, 1).unsqueeze(0) * 2 - 1
    conc = extractor.concentrations(extractor.optical_density(x))[0].permute(1, 2, 0).numpy()
    # scikit-image scales OD by 1 / -ln(1e-6), clips negative concentrations and does not normalise the vectors.
    expected = rgb2hed(rgb) * np.linalg.norm(np.asarray(RUIFROK_HED_VECTORS), axis=1)
    np.testing.assert_allclose(np.maximum(conc / -np.log(1e-6), 0), expected, atol=2e-5)


def test_stain_features_separate_eosin_from_dab_and_ignore_illumination() -> None:
    extractor = StainFeatureExtractor()
    pad = torch.ones(1, 3, 16, 16)  # bright glass so the white point is found
    eosin = torch.cat([_stain_image((0.2, 0.6, 0.0)), pad], dim=3)
    dab = torch.cat([_stain_image((0.2, 0.0, 0.6)), pad], dim=3)
    f_eosin, f_dab = extractor(eosin)[0], extractor(dab)[0]
    assert f_eosin.shape == (StainFeatureExtractor.num_features,)
    assert f_eosin[7] > 0.3 and abs(float(f_dab[7])) < 0.05  # eosin proportion
    assert f_dab[8] > 0.3 and abs(float(f_eosin[8])) < 0.05  # DAB proportion
    assert f_eosin[12] > f_dab[12]  # eosin index
    # Grey glass (a dimmer lamp) scales every pixel; white balancing undoes it.
    dim = (eosin + 1) * 0.5 * 0.7 * 2 - 1
    torch.testing.assert_close(extractor(dim)[0, 6:9], f_eosin[6:9], atol=1e-4, rtol=1e-3)
    assert not torch.allclose(StainFeatureExtractor(white_balance=False)(dim)[0, 6:9], f_eosin[6:9], atol=1e-2)


def _hue(extractor: StainFeatureExtractor, image: torch.Tensor) -> torch.Tensor:
    return extractor(image)[0, 14 : 14 + HUE_BINS]


def test_hue_histogram_places_each_stain_and_gives_grey_no_vote() -> None:
    extractor = StainFeatureExtractor()
    pad = torch.ones(1, 3, 16, 16)  # bright glass so the white point is found
    bins = {}
    for name, conc in {"h": (0.8, 0.0, 0.0), "e": (0.0, 0.8, 0.0), "dab": (0.0, 0.0, 0.8)}.items():
        hue = _hue(extractor, torch.cat([_stain_image(conc), pad], dim=3))
        assert float(hue.sum()) == pytest.approx(1.0, abs=1e-4)
        bins[name] = int(hue.argmax())
    # 30-degree bins from the hematoxylin direction: H at 0, eosin at 56 (bin 2), DAB at 138 (bin 5).
    assert bins == {"h": 0, "e": 2, "dab": 5}
    # Grey (shading, grey glass, fat) has OD but no chroma: no hue vote, whereas deconvolution reads it as H + DAB.
    grey = torch.cat([torch.full((1, 3, 16, 16), 0.2), pad], dim=3)
    features = extractor(grey)[0]
    assert float(features[13]) > 0.4  # it is "tissue" by optical density
    assert float(features[14 + HUE_BINS]) == pytest.approx(0.0, abs=1e-3)  # no saturation
    torch.testing.assert_close(_hue(extractor, grey), torch.full((HUE_BINS,), 1.0 / HUE_BINS), atol=1e-3, rtol=0)
    # Grey mixed into pink tissue leaves the pink hue histogram as it was.
    pink = torch.cat([_stain_image((0.1, 0.7, 0.0)), pad], dim=3)
    greyed = torch.cat([_stain_image((0.1, 0.7, 0.0)), torch.full((1, 3, 16, 16), 0.2), pad], dim=3)
    torch.testing.assert_close(_hue(extractor, greyed), _hue(extractor, pink), atol=0.02, rtol=0)


def test_stain_only_selector_has_no_cnn_and_needs_stain_features() -> None:
    model = BranchSelector(channels=[], stain_features="hue").eval()
    assert len(model.features) == 0 and model.classifier.in_features == model.stain_mlp[1].out_features
    x = torch.rand(3, 3, 40, 40) * 2 - 1
    assert model(x).shape == (3, 2)
    # Texture-free: shuffling the pixels of an image hardly changes its logits (only the white point, a maximum over
    # 4x4 local means, sees the arrangement).
    shuffled = x.flatten(2)[:, :, torch.randperm(40 * 40)].view_as(x)
    torch.testing.assert_close(model(shuffled), model(x), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="use_stain_features"):
        BranchSelector(channels=[], use_stain_features=False)


def test_lab_appearance_fades_stains_and_turns_the_eosin_hue() -> None:
    extractor = StainFeatureExtractor()
    pad = torch.ones(1, 3, 16, 16)
    pink = ((torch.cat([_stain_image((0.1, 0.9, 0.0)), pad], dim=3) + 1) * 0.5).expand(8, 3, 16, 32)
    od = lambda rgb: float(-torch.log(rgb.clamp_min(1e-4)).mean())  # noqa: E731
    kept = lab_appearance(pink, torch.Generator().manual_seed(0), strength=0.0 + 1e-6)
    faded = lab_appearance(pink, torch.Generator().manual_seed(0), strength=1e-6, fade_prob=1.0)
    assert od(faded) < 0.8 * od(kept)
    turned = lab_appearance(pink, torch.Generator().manual_seed(0), strength=1e-6, eosin_hue=(0.9, 1.0))
    hue_before = extractor(kept * 2 - 1)[:, 14 : 14 + HUE_BINS].mean(0)
    hue_after = extractor(turned * 2 - 1)[:, 14 : 14 + HUE_BINS].mean(0)
    assert int(hue_before.argmax()) == 2 and int(hue_after.argmax()) in (3, 4)  # pink (56 deg) to magenta (90-120)
    with pytest.raises(ValueError, match="fade_prob"):
        LabAppearanceBatch(fade_prob=1.5)
    with pytest.raises(ValueError, match="eosin_hue"):
        LabAppearanceBatch(eosin_hue=(1.0, 0.0))


def test_stain_feature_extractor_validation() -> None:
    with pytest.raises(ValueError, match="linearly dependent"):
        StainFeatureExtractor(stain_vectors=((1, 0, 0), (1, 0, 0), (0, 0, 1)))
    with pytest.raises(ValueError, match="shape"):
        StainFeatureExtractor(stain_vectors=((1, 0, 0), (0, 1, 0)))
    with pytest.raises(ValueError, match="eps"):
        StainFeatureExtractor(eps=0)
    with pytest.raises(ValueError, match="chroma_floor"):
        StainFeatureExtractor(chroma_floor=-0.1)


def test_scenario_rules() -> None:
    assert scenario_id(True, True) == DUAL
    assert scenario_id(True, False) == HE_ONLY
    assert scenario_id(False, True) == IHC_ONLY
    with pytest.raises(ValueError, match="both are missing"):
        scenario_id(False, False)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert scenario_ids(mask).tolist() == [DUAL, HE_ONLY, IHC_ONLY]
    assert scenario_ids(mask > 0).tolist() == [DUAL, HE_ONLY, IHC_ONLY]
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        check_mask(torch.ones(3))
    with pytest.raises(ValueError, match="only 0"):
        check_mask(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        check_mask(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_routing_of_unknown_stains() -> None:
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    he, ihc, mask = route_unknown_stains(x, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(he[[0, 2]], x[[0, 2]])
    torch.testing.assert_close(ihc[1], x[1])
    assert he[1].abs().sum() == 0 and ihc[[0, 2]].abs().sum() == 0
    # The output is a valid classifier batch.
    _, _, available = check_stain_inputs(he, ihc, mask)
    assert scenario_ids(available).tolist() == [HE_ONLY, IHC_ONLY, HE_ONLY]
    with pytest.raises(ValueError, match="one entry per image"):
        route_unknown_stains(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0 \\(H&E\\) or 1"):
        route_unknown_stains(x, torch.tensor([0, 2, 1]))
    # Declared stains are never moved, whatever the selector says.
    declared_ihc = torch.rand(3, 3, 8, 8)
    given = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    unknown = torch.tensor([False, False, True])
    he2, ihc2, mask2 = assign_unknown_stains(x, declared_ihc, given, unknown, torch.tensor([True, True, True]))
    torch.testing.assert_close(mask2, torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(he2[:2], x[:2])
    torch.testing.assert_close(ihc2[2], x[2])
    assert he2[2].abs().sum() == 0


def _train_selector_stage(root: Path, **overrides) -> dict[str, torch.Tensor]:
    run_bundle("train.json", "train_selector", **tiny_overrides(root, root / "cache", **overrides))
    return torch.load(root / "models" / "selector.pt", weights_only=True)


def test_selector_stage_is_deterministic_and_records_its_architecture(tmp_path: Path) -> None:
    first = _train_selector_stage(tmp_path / "a", seed=3)
    second = _train_selector_stage(tmp_path / "b", seed=3)
    other = _train_selector_stage(tmp_path / "c", seed=4)
    assert first.keys() == second.keys()
    for name, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[name]), name
    assert any(not torch.equal(v, other[k]) for k, v in first.items() if isinstance(v, torch.Tensor))
    record = first["_extra_state"]
    assert record["class"] == "BranchSelector" and record["metadata"]["crop_size"] == 32
    selector = frozen_selector(tmp_path / "a" / "models" / "selector.pt")
    assert not selector.training and not any(p.requires_grad for p in selector.parameters())


def _real_images() -> list[tuple[str, np.ndarray, int]]:
    from skimage import data as skdata

    from her2_monai.data.image_reader import read_rgb

    items = []
    sources = {"bci/HE/test": 0, "bci/IHC/test": 1, "mist/HE": 0, "mist/IHC": 1}
    for folder, stain in sources.items():
        files = sorted(f for f in (SHARED_DATA / folder).iterdir() if f.suffix in (".png", ".jpg"))
        items += [(f"{folder}/{f.name}", read_rgb(f), stain) for f in files]
    items.append(("skimage immunohistochemistry", skdata.immunohistochemistry(), 1))
    return items


@pytest.mark.slow
def test_selector_trained_on_demo_labels_real_images(default_selector_file: Path) -> None:
    """Trained by the bundle stage on procedural demo renders only, the selector must label real BCI, MIST and
    scikit-image images."""
    if not (SHARED_DATA / "bci").is_dir() or not (SHARED_DATA / "mist").is_dir():
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA}")
    model = frozen_selector(default_selector_file)
    images = _real_images()
    assert sum(s == 0 for *_, s in images) >= 10 and sum(s == 1 for *_, s in images) >= 11
    wrong = []
    with torch.no_grad():
        for name, img, stain in images:
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 127.5 - 1
            x = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
            p_ihc = model(x).softmax(dim=1)[0, 1].item()
            if (p_ihc >= 0.5) != bool(stain):
                wrong.append(f"{name}: p(IHC)={p_ihc:.3f}")
    assert not wrong, f"mislabelled real images: {wrong}"
