"""HER2FlexibleNet can fit a small demo set in every scenario (dual, H&E + CM-GAN-synthesised IHC, IHC-only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from her2_monai.constants import NUM_CLASSES
from her2_monai.losses import HER2Loss
from her2_monai.networks.cmgan import CrossModalGAN
from her2_monai.networks.her2net import HER2FlexibleNet

pytestmark = pytest.mark.slow

SIZE = 64
PER_CLASS = 8
MAX_STEPS = 30
TARGET = 0.95
SCENARIO_MASKS = {"dual": (1.0, 1.0), "he_only": (1.0, 0.0), "ihc_only": (0.0, 1.0)}


@pytest.fixture(scope="module")
def demo_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    demo = pytest.importorskip("her2_monai.data.demo")
    generator = demo.DemoPairGenerator(image_size=SIZE)
    he, ihc, labels = [], [], []
    for label in range(NUM_CLASSES):
        for seed in range(PER_CLASS):
            he_img, ihc_img = generator.render(label, seed)
            he.append(np.asarray(he_img, dtype=np.float32))
            ihc.append(np.asarray(ihc_img, dtype=np.float32))
            labels.append(label)

    def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0

    return to_tensor(he), to_tensor(ihc), torch.tensor(labels)


@torch.no_grad()
def _recalibrate_batchnorm(net: HER2FlexibleNet, he: torch.Tensor, ihc: torch.Tensor, mask: torch.Tensor) -> None:
    """Replace the running statistics of trainable BatchNorm layers by the exact statistics of the training set.

    After a handful of large steps the exponential running averages still describe the first steps' weights, so an
    eval-mode forward would measure the lag of the averages, not what the network has learnt ("precise BN").
    Frozen BatchNorm layers (frozen ResNet stages, the CM-GAN) are in eval mode and are left alone.
    """
    net.train()
    layers = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.training]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    net(he, ihc, mask)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    net.eval()


@pytest.mark.parametrize("scenario", list(SCENARIO_MASKS))
def test_overfits_demo_pairs(demo_pairs, scenario):
    he_all, ihc_all, labels = demo_pairs
    torch.manual_seed(0)
    cmgan = CrossModalGAN(ngf=8, n_blocks=1) if scenario != "ihc_only" else None  # untrained: synthesis only
    net = HER2FlexibleNet(
        shared_backbone="resnet18", specific_backbone="resnet10", cmgan=cmgan, dropout=0.1,
        missing_strategy="cmgan" if cmgan is not None else "feature_substitution",
    )  # fmt: skip
    mask = torch.tensor(SCENARIO_MASKS[scenario]).expand(len(labels), 2).contiguous()
    he = he_all * mask[:, :1, None, None]
    ihc = ihc_all * mask[:, 1:, None, None]
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-3, weight_decay=1e-4)

    accuracy, steps = 0.0, 0
    while steps < MAX_STEPS:
        net.train()
        out = net(he, ihc, mask)
        loss = HER2Loss()(out, labels, mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 5 == 0 or (out["logits"].argmax(1) == labels).float().mean() == 1.0:
            _recalibrate_batchnorm(net, he, ihc, mask)
            with torch.no_grad():
                accuracy = (net(he, ihc, mask)["logits"].argmax(1) == labels).float().mean().item()
            if accuracy >= TARGET:
                break
    assert accuracy >= TARGET, f"{scenario}: training accuracy {accuracy:.3f} after {steps} steps"
    if scenario == "he_only":
        # The IHC branch saw CM-GAN output, not the zeros of the missing slot.
        assert out["ihc_input"].abs().amax() > 0
