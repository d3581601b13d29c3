"""ImageNet weights through the torch hub cache: torchvision key mapping, local files, 'auto', the offline message.

No test downloads anything: torchvision-format state dicts are made here, written where the hub cache keeps them,
and the download function is replaced by one that fails like a machine without network.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch

from her2_monai.networks import HER2FlexibleNet
from her2_monai.networks.encoders import EfficientNetTrunk, ResNetTrunk
from her2_monai.networks.pretrained import (
    IMAGENET_WEIGHT_URLS,
    PretrainedWeights,
    PretrainedWeightsError,
    hub_checkpoint_path,
    load_pretrained_efficientnet,
)
from her2_monai.networks.unfreeze import StateDictMismatchError

#: torchvision's EfficientNet-B0 stages (expand ratio, kernel, stride, in, out, blocks), as torchvision builds them.
B0_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]  # fmt: skip


def _bn(prefix: str, channels: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(channels, generator=gen) + 0.5,
        f"{prefix}.bias": torch.randn(channels, generator=gen),
        f"{prefix}.running_mean": torch.randn(channels, generator=gen),
        f"{prefix}.running_var": torch.rand(channels, generator=gen) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def torchvision_efficientnet_b0_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the keys and shapes of ``torchvision.models.efficientnet_b0().state_dict()``, random values."""
    gen = torch.Generator().manual_seed(seed)
    state = {"features.0.0.weight": torch.randn(32, 3, 3, 3, generator=gen), **_bn("features.0.1", 32, gen)}
    for s, (expand, kernel, _, c_in, c_out, blocks) in enumerate(B0_STAGES):
        for j in range(blocks):
            inp = c_in if j == 0 else c_out
            hidden, squeeze, p = inp * expand, max(1, inp // 4), f"features.{s + 1}.{j}.block"
            layer = 0
            if expand != 1:
                state[f"{p}.0.0.weight"] = torch.randn(hidden, inp, 1, 1, generator=gen)
                state.update(_bn(f"{p}.0.1", hidden, gen))
                layer = 1
            state[f"{p}.{layer}.0.weight"] = torch.randn(hidden, 1, kernel, kernel, generator=gen)
            state.update(_bn(f"{p}.{layer}.1", hidden, gen))
            state[f"{p}.{layer + 1}.fc1.weight"] = torch.randn(squeeze, hidden, 1, 1, generator=gen)
            state[f"{p}.{layer + 1}.fc1.bias"] = torch.randn(squeeze, generator=gen)
            state[f"{p}.{layer + 1}.fc2.weight"] = torch.randn(hidden, squeeze, 1, 1, generator=gen)
            state[f"{p}.{layer + 1}.fc2.bias"] = torch.randn(hidden, generator=gen)
            state[f"{p}.{layer + 2}.0.weight"] = torch.randn(c_out, hidden, 1, 1, generator=gen)
            state.update(_bn(f"{p}.{layer + 2}.1", c_out, gen))
    state["features.8.0.weight"] = torch.randn(1280, 320, 1, 1, generator=gen)
    state.update(_bn("features.8.1", 1280, gen))
    state["classifier.1.weight"] = torch.randn(1000, 1280, generator=gen)
    state["classifier.1.bias"] = torch.randn(1000, generator=gen)
    return state


def torchvision_resnet_state(name: str = "resnet18") -> dict[str, torch.Tensor]:
    """A torchvision-format ResNet state dict (MONAI's ResNet in torchvision's layout has the same keys) plus fc."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in ResNetTrunk(name).resnet.state_dict().items()}
    width = 512 if name in ("resnet18", "resnet34") else 2048
    return {**state, "fc.weight": torch.randn(1000, width), "fc.bias": torch.randn(1000)}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache, and a download function that fails like a machine without network."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_efficientnet_b0_weights_land_on_the_monai_layers():
    state = torchvision_efficientnet_b0_state()
    trunk = EfficientNetTrunk("efficientnet-b0")
    report = load_pretrained_efficientnet(trunk.net, state)
    assert set(report["loaded"]) == set(trunk.net.state_dict())  # every stem and block entry comes from the file
    assert sorted(report["ignored"]) == sorted(k for k in state if k.startswith(("features.8.", "classifier.")))
    net, blocks = trunk.net, trunk.net._blocks
    pairs = {
        "features.0.0.weight": net._conv_stem.weight,
        "features.0.1.running_var": net._bn0.running_var,
        "features.1.0.block.0.0.weight": blocks[0][0]._depthwise_conv.weight,  # no expansion in stage 1
        "features.1.0.block.1.fc2.bias": blocks[0][0]._se_expand.bias,
        "features.2.0.block.0.0.weight": blocks[1][0]._expand_conv.weight,
        "features.2.1.block.1.1.weight": blocks[1][1]._bn1.weight,
        "features.6.3.block.2.fc1.bias": blocks[5][3]._se_reduce.bias,
        "features.7.0.block.3.0.weight": blocks[6][0]._project_conv.weight,
        "features.7.0.block.3.1.running_mean": blocks[6][0]._bn2.running_mean,
    }
    for key, tensor in pairs.items():
        assert torch.equal(tensor, state[key]), key
    with torch.no_grad():
        assert trunk.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 320, 2, 2)


def test_efficientnet_weights_of_another_size_are_refused_with_the_keys():
    state = torchvision_efficientnet_b0_state()
    state["features.1.0.block.0.0.weight"] = torch.randn(48, 1, 3, 3)
    del state["features.7.0.block.3.0.weight"]
    state["features.9.weight"] = torch.randn(3)
    with pytest.raises(StateDictMismatchError) as err:
        load_pretrained_efficientnet(EfficientNetTrunk().net, state)
    message = str(err.value)
    assert "1 missing key(s) [_blocks.6.15._project_conv.weight]" in message
    assert "1 unexpected key(s) [features.9.weight]" in message
    assert "_blocks.0.0._depthwise_conv.weight: file (48, 1, 3, 3) vs model (32, 1, 3, 3)" in message


def test_imagenet_weights_from_the_hub_cache_reach_both_encoders(hub_cache):
    resnet, effnet = torchvision_resnet_state("resnet18"), torchvision_efficientnet_b0_state()
    torch.save(resnet, hub_cache / "resnet18-f37072fd.pth")
    torch.save(effnet, hub_cache / "efficientnet_b0_rwightman-7f5810bc.pth")
    assert hub_checkpoint_path("efficientnet-b0") == hub_cache / "efficientnet_b0_rwightman-7f5810bc.pth"
    weights = PretrainedWeights("imagenet", "resnet18", "efficientnet-b0")
    assert weights.description == (
        "shared resnet18: ImageNet (torchvision resnet18-f37072fd.pth); "
        "specific efficientnet-b0: ImageNet (torchvision efficientnet_b0_rwightman-7f5810bc.pth)"
    )
    net = HER2FlexibleNet(
        shared_backbone="resnet18",
        specific_backbone="efficientnet-b0",
        pretrained_weights=weights.shared(),
        specific_pretrained_weights=weights.specific(),
    )
    assert torch.equal(net.encoder.shared.resnet.layer3[0].conv1.weight, resnet["layer3.0.conv1.weight"])
    for stain in ("he", "ihc"):
        assert torch.equal(net.encoder.specific[stain].net._conv_stem.weight, effnet["features.0.0.weight"])
    # The record holds the architecture, not where the starting weights came from.
    assert "pretrained_weights" not in net.architecture


def test_offline_imagenet_request_names_the_file_to_place_where(hub_cache):
    weights = PretrainedWeights("imagenet", "resnet50", "efficientnet-b0")
    with pytest.raises(PretrainedWeightsError) as err:
        weights.fetch()
    message = str(err.value)
    assert IMAGENET_WEIGHT_URLS["resnet50"] in message and "Temporary failure in name resolution" in message
    assert f"place it at '{hub_cache / 'resnet50-0676ba61.pth'}'" in message
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights for backbone 'resnet10'"):
        PretrainedWeights("imagenet", "resnet50", "resnet10")


def test_auto_uses_what_the_cache_holds_and_says_so(hub_cache, caplog):
    nothing = PretrainedWeights("auto", "resnet50", "efficientnet-b0")
    with caplog.at_level("WARNING", logger="her2_monai.networks.pretrained"):
        assert nothing.fetch() == {"shared": None, "specific": None} and not nothing.uses_pretrained
    assert "none in the torch hub cache" in caplog.text and "resnet50-0676ba61.pth" in caplog.text
    torch.save(torchvision_resnet_state("resnet18"), hub_cache / "resnet18-f37072fd.pth")
    partly = PretrainedWeights("auto", "resnet18", "resnet10")
    assert partly.description == (
        "shared resnet18: ImageNet (torchvision resnet18-f37072fd.pth); "
        "specific resnet10: random weights: no ImageNet weights exist for resnet10"
    )
    assert set(partly.fetch()["shared"]) >= {"conv1.weight", "fc.weight"} and partly.specific() is None


def test_a_local_file_is_the_shared_encoders_and_none_means_random(tmp_path, hub_cache):
    path = tmp_path / "my_resnet18.pth"
    torch.save(torchvision_resnet_state("resnet18"), path)
    local = PretrainedWeights(str(path), "resnet18", "efficientnet-b0")
    assert local.fetch() == {"shared": str(path.resolve()), "specific": None}
    assert local.description.startswith(f"shared resnet18: {path.resolve()}")
    net = HER2FlexibleNet(shared_backbone="resnet18", specific_backbone="resnet10", pretrained_weights=local.shared())
    assert torch.equal(net.encoder.shared.resnet.conv1.weight, torch.load(path, weights_only=True)["conv1.weight"])
    assert PretrainedWeights("", "resnet50", "efficientnet-b0").fetch() == {"shared": None, "specific": None}
    with pytest.raises(FileNotFoundError, match="neither a file nor one of"):
        PretrainedWeights(str(tmp_path / "absent.pth"), "resnet50", "efficientnet-b0")
    assert sorted(IMAGENET_WEIGHT_URLS) == [
        "efficientnet-b0",
        "resnet101",
        "resnet152",
        "resnet18",
        "resnet34",
        "resnet50",
    ]
