"""The deployed path's inference rewrites (her2_monai.inference.optimize): exact BatchNorm folding, the same answers
as the unoptimised model, and the switch that turns them off."""

from __future__ import annotations

import pytest
import torch
from conftest import probability_tolerance
from torch import nn

from her2_monai.inference import HER2Deploy
from her2_monai.inference.optimize import (
    OPTIMIZE_ENV,
    conv_bn_pairs,
    fold_batchnorm,
    inference_optimization,
    optimize_for_inference,
)
from her2_monai.networks import BranchSelector, CrossModalGAN, HER2FlexibleNet
from her2_monai.runtime import execution_settings

pytestmark = pytest.mark.arithmetic


def _randomise_batchnorm(net: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm statistics and an affine map far from the identity, so folding has work to do."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def net() -> HER2FlexibleNet:
    torch.manual_seed(0)
    model = HER2FlexibleNet(
        shared_backbone="resnet18", specific_backbone="resnet10", cmgan=CrossModalGAN(ngf=8, n_blocks=1),
        selector=BranchSelector(), attention_channels=64, fusion_channels=128,
    ).eval()  # fmt: skip
    _randomise_batchnorm(model)
    return model


def _batch(n: int = 6, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).repeat(n // 3, 1)
    he = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1) * mask[:, :1, None, None]
    ihc = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1) * mask[:, 1:, None, None]
    return he, ihc, mask


def _count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_batchnorm_folding_is_exact_in_fp32(net):
    fast = optimize_for_inference(net, bf16=False)
    assert _count_batchnorms(net) > 0 and _count_batchnorms(fast) == 0  # every BatchNorm of this model folds
    assert fast is not net and _count_batchnorms(net) > 0  # the trained model is left as it was
    he, ihc, mask = _batch()
    with torch.no_grad():
        for name in ("he_to_ihc", "ihc_to_he"):
            expected, got = getattr(net.cmgan, name)(he), getattr(fast.cmgan, name)(he)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), name
        expected, got = net.encoder.shared(he), fast.encoder.shared(he)
        assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
        expected, got = net(he, ihc, mask)["logits"], fast(he, ihc, mask)["logits"]
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_folding_leaves_a_convolution_whose_output_is_also_used_elsewhere():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.ConvTranspose2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn2(self.conv2(self.bn(y) + y))

    module = Residual().eval()
    _randomise_batchnorm(module)
    assert conv_bn_pairs(module) == [("conv2", "bn2")]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = module(x)
        assert fold_batchnorm(module) == 1
        assert isinstance(module.bn, nn.BatchNorm2d) and isinstance(module.bn2, nn.Identity)
        assert torch.allclose(module(x), expected, atol=1e-5, rtol=1e-5)


def test_folding_leaves_batchnorm_in_training_mode():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert fold_batchnorm(module.train()) == 0
    assert isinstance(module[1], nn.BatchNorm2d)


@pytest.mark.parametrize("amp", [None, True], ids=["default-arithmetic", "bf16"])
def test_optimised_deploy_gives_the_same_calls_and_probabilities(net, amp):
    amp = execution_settings("cpu").amp if amp is None else amp
    tolerance = 2e-2 if amp else probability_tolerance(1e-5)
    he, ihc, mask = _batch()
    plain = HER2Deploy(net, optimize=False).eval().predict_batch(he, ihc, mask, amp=amp)
    deploy = HER2Deploy(net, optimize=True).eval()
    fast = deploy.predict_batch(he, ihc, mask, amp=amp)
    assert deploy.inference_network(amp) is not net
    assert torch.equal(fast["scenario"], plain["scenario"])
    # The branch selector's confidence in each given image (it runs through the optimised copy too).
    confidence, fast_confidence = plain["stain_confidence"], fast["stain_confidence"]
    given = ~confidence.isnan()
    assert torch.equal(given, ~fast_confidence.isnan())
    assert float((fast_confidence[given] - confidence[given]).abs().max()) <= tolerance
    expected, got = plain["pred"].softmax(1), fast["pred"].softmax(1)
    assert float((got - expected).abs().max()) <= tolerance
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert torch.equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def test_switch_and_state(net, monkeypatch):
    deploy = HER2Deploy(net).eval()
    assert deploy.optimize and deploy.inference_network(False) is not net
    keys = set(HER2Deploy(net).state_dict())
    assert set(deploy.state_dict()) == keys  # the inference copy is not part of the model file
    deploy.load_state_dict(deploy.state_dict())
    assert deploy._fast is None  # new weights: the copy is rebuilt on the next call
    assert deploy.train().inference_network(False) is net  # training mode: the network as trained

    monkeypatch.setenv(OPTIMIZE_ENV, "off")
    assert HER2Deploy(net).eval().inference_network(True) is net
    assert inference_optimization() is False and inference_optimization("on") is True
    monkeypatch.setenv(OPTIMIZE_ENV, "sometimes")
    with pytest.raises(ValueError, match=OPTIMIZE_ENV):
        HER2Deploy(net)
