"""Class activation maps (Score-CAM on MONAI's CAM base, MONAI's Grad-CAM/Grad-CAM++) and the attention summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from her2_monai.explain import ScoreCAM, StainCAM, attention_summary, normalize_maps, overlay, save_explanation


class _Toy(nn.Module):
    """Feature 0 copies input channel 0; the class-1 logit is the sum of feature 0, the class-0 logit is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(6, 4, kernel_size=1, bias=False)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.features(x)[:, 0].sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(total), 0.05 * total], dim=1)


def test_score_cam_finds_the_evidence() -> None:
    x = torch.zeros(1, 6, 16, 16)
    x[:, 0, :8, :8] = 1.0  # the evidence for class 1 sits in the top-left quadrant of the first "stain"
    cam = ScoreCAM(_Toy(), "features", input_channels=slice(0, 3), max_channels=4)
    result = cam(x, class_idx=1)
    assert result.shape == (1, 1, 16, 16) and float(result.min()) >= 0.0 and float(result.max()) == pytest.approx(1.0)
    assert float(result[0, 0, :6, :6].mean()) > 0.9 and float(result[0, 0, 10:, 10:].max()) < 0.1
    assert torch.equal(normalize_maps(torch.ones(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))  # flat map: no evidence


def test_stain_cam_maps_each_stain_with_every_method() -> None:
    from her2_monai.networks import CrossModalGAN, HER2FlexibleNet

    torch.manual_seed(0)
    net = HER2FlexibleNet(
        shared_backbone="resnet18",
        specific_backbone="resnet10",
        cmgan=CrossModalGAN(ngf=4, n_blocks=1),
        fusion_channels=32,
        attention_channels=16,
    ).eval()
    cams = StainCAM(net, score_cam_channels=8)
    he, ihc = torch.rand(1, 3, 64, 64) * 2 - 1, torch.zeros(1, 3, 64, 64)
    out = cams.maps(he, ihc, torch.tensor([[1.0, 0.0]]))  # IHC missing: the map is over the synthetic IHC
    assert set(out["cams"]) == {"gradcam", "gradcampp", "scorecam"}
    for maps in out["cams"].values():
        for stain in ("he", "ihc"):
            assert maps[stain].shape == (64, 64) and 0.0 <= float(maps[stain].min()) <= float(maps[stain].max()) <= 1.0
    assert not torch.equal(out["ihc"], torch.zeros(3, 64, 64))  # synthesised by the CM-GAN, not the zero placeholder
    assert out["stain_attention"].shape == (2,) and out["probabilities"].sum() == pytest.approx(1.0, abs=1e-5)
    assert not net._forward_hooks and not net.encoder.fusion["he"]._forward_hooks  # the hooks live on a copy
    with pytest.raises(ValueError, match="one case"):
        cams.maps(torch.cat([he, he]), torch.cat([ihc, ihc]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown CAM"):
        StainCAM(net, ("lime",))


def test_explanation_figure_and_overlay(tmp_path) -> None:
    rgb = np.full((32, 32, 3), 200, np.uint8)
    cam = np.zeros((32, 32))
    cam[:16] = 1.0
    blended = overlay(rgb, cam)
    assert blended.shape == (32, 32, 3) and blended.dtype == np.uint8 and not np.array_equal(blended[0], blended[-1])
    explanation = {
        "class_idx": 2,
        "he": torch.rand(3, 32, 32) * 2 - 1,
        "ihc": torch.rand(3, 32, 32) * 2 - 1,
        "stain_attention": torch.tensor([0.4, 0.6]),
        "cams": {"gradcam": {"he": torch.rand(32, 32), "ihc": torch.rand(32, 32)}},
    }
    from PIL import Image

    path = save_explanation(tmp_path / "case.png", explanation, {"he": False, "ihc": True}, "HER2 2+")
    with Image.open(path) as image:
        assert image.format == "PNG" and len(set(image.convert("L").getdata())) > 50


def test_attention_summary_compares_real_and_synthetic_stains() -> None:
    summary = attention_summary(
        {
            "dual": np.array([[0.40, 0.60], [0.50, 0.70], [0.45, 0.65]]),
            "he_only": np.array([[0.45, 0.50], [0.50, 0.60], [0.40, 0.66]]),
            "ihc_only": np.array([[0.42, 0.60], [0.52, 0.70], [0.30, 0.60]]),
        }
    )
    ihc = summary["ihc_real_vs_synthetic"]
    assert ihc["real_mean"] == pytest.approx(0.65) and ihc["synthetic_mean"] == pytest.approx(0.5866667, abs=1e-6)
    assert ihc["difference"] == pytest.approx(0.0633333, abs=1e-6) and ihc["real_higher_share"] == pytest.approx(2 / 3)
    assert ihc["test"].startswith("wilcoxon") and 0.0 <= ihc["p_value"] <= 1.0
    he = summary["he_real_vs_synthetic"]
    assert he["real_mean"] == pytest.approx(0.45) and he["synthetic_mean"] == pytest.approx(0.4133333, abs=1e-6)
    assert summary["per_scenario"]["dual"] == pytest.approx({"he": 0.45, "ihc": 0.65})
