"""Tests of HER2FlexibleNet: encoders, attention, hybrid unfreezing, pretrained loading, its loss, deploy module."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAINING, bundle_component
from monai.networks.nets import resnet18
from torch import nn

from her2_monai.constants import DUAL, HE_ONLY, IHC_ONLY, NUM_CLASSES
from her2_monai.inference.deploy import HER2Deploy
from her2_monai.losses import HER2Loss
from her2_monai.losses.disentangle import DomainAlignmentLoss, DomainClassificationLoss, gaussian_mmd
from her2_monai.networks.attention import ModalitySensitiveAttention
from her2_monai.networks.cmgan import CrossModalGAN
from her2_monai.networks.encoders import EfficientNetTrunk, ResNetTrunk, build_encoder
from her2_monai.networks.her2net import HER2FlexibleNet
from her2_monai.networks.selector import BranchSelector
from her2_monai.networks.unfreeze import (
    DEFAULT_FROZEN_STAGES,
    StateDictMismatchError,
    freeze_resnet_stages,
    load_pretrained_resnet,
    resolve_hybrid_unfreezing,
)
from her2_monai.stain_batch import route_unknown_stains

SIZE = 64
MASKS = {
    "dual": [[1, 1]] * 3,
    "he_only": [[1, 0]] * 3,
    "ihc_only": [[0, 1]] * 3,
    "mixed": [[1, 1], [1, 0], [0, 1]],
}
SCENARIO_IDS = {"dual": DUAL, "he_only": HE_ONLY, "ihc_only": IHC_ONLY}


def _small_net(strategy: str = "cmgan", seed: int = 0, **kwargs) -> HER2FlexibleNet:
    """A small HER2FlexibleNet: ResNet18 shared trunk, ResNet10 specific trunks unless ``specific_backbone`` says."""
    torch.manual_seed(seed)
    kwargs.setdefault("specific_backbone", "resnet10")
    cmgan = CrossModalGAN(ngf=8, n_blocks=1) if strategy == "cmgan" else None
    kwargs.setdefault("attention_channels", 64)
    kwargs.setdefault("fusion_channels", 128)
    return HER2FlexibleNet(shared_backbone="resnet18", cmgan=cmgan, missing_strategy=strategy, **kwargs)


def _batch(mask_rows: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(mask_rows, dtype=torch.float32)
    he = (torch.rand(len(mask_rows), 3, SIZE, SIZE, generator=g) * 2 - 1) * mask[:, 0, None, None, None]
    ihc = (torch.rand(len(mask_rows), 3, SIZE, SIZE, generator=g) * 2 - 1) * mask[:, 1, None, None, None]
    return he, ihc, mask


@pytest.fixture(scope="module")
def nets() -> dict[str, HER2FlexibleNet]:
    # The default specific encoder (EfficientNet-B0), so shapes and routing are checked with it.
    return {s: _small_net(s, specific_backbone="efficientnet-b0").eval() for s in ("cmgan", "feature_substitution")}


@pytest.mark.parametrize("strategy", ["cmgan", "feature_substitution"])
@pytest.mark.parametrize("case", list(MASKS))
def test_output_shapes_and_scenarios(nets, strategy, case):
    net = nets[strategy]
    he, ihc, mask = _batch(MASKS[case])
    with torch.no_grad():
        out = net(he, ihc, mask)
    b = mask.shape[0]
    expected_scenario = [
        SCENARIO_IDS["dual" if r == [1, 1] else "he_only" if r == [1, 0] else "ihc_only"] for r in MASKS[case]
    ]
    assert out["scenario"].tolist() == expected_scenario
    assert out["logits"].shape == (b, NUM_CLASSES)
    assert torch.isfinite(out["logits"]).all()
    assert out["channel_attention"].shape == (b, 2 * 64)
    assert out["stain_attention"].shape == (b, 2)
    assert out["spatial_attention"].shape == (b, 1, SIZE // 32, SIZE // 32)
    assert out["shared_he"].shape == out["shared_ihc"].shape == (b, 512, SIZE // 32, SIZE // 32)
    assert out["specific_logits_he"].shape == out["specific_logits_ihc"].shape == (b, 2)
    assert out["embedding"].shape == (b, 4 * 64)
    present = mask.bool()
    # Real stains are encoded untouched; missing ones are filled (synthesised or substituted), never left as zeros.
    for col, (key, real) in enumerate((("he_input", he), ("ihc_input", ihc))):
        assert torch.equal(out[key][present[:, col]], real[present[:, col]])
        if (~present[:, col]).any():
            assert out[key][~present[:, col]].abs().amax() > 0
    if strategy == "feature_substitution":
        for i, row in enumerate(MASKS[case]):
            if row != [1, 1]:
                # The missing stain's shared feature is the available stain's; its specific feature is zero.
                torch.testing.assert_close(out["shared_he"][i], out["shared_ihc"][i])
                missing = "specific_ihc" if row == [1, 0] else "specific_he"
                assert out[missing][i].abs().amax() == 0


def test_feature_substitution_available_specific():
    net = _small_net("feature_substitution", substitute_specific="available").eval()
    he, ihc, mask = _batch(MASKS["mixed"])
    with torch.no_grad():
        out = net(he, ihc, mask)
    torch.testing.assert_close(out["specific_ihc"][1], out["specific_he"][1])  # H&E-only sample
    torch.testing.assert_close(out["specific_he"][2], out["specific_ihc"][2])  # IHC-only sample
    # The dual sample keeps both (untrained eval-mode features are tiny, hence the relative comparison).
    a, b = out["specific_he"][0], out["specific_ihc"][0]
    assert (a - b).norm() > 1e-3 * a.norm()


def test_missing_stain_none_is_accepted():
    net = _small_net("feature_substitution").eval()
    he, _, mask = _batch(MASKS["he_only"])
    with torch.no_grad():
        a = net(he, None, mask)["logits"]
        b = net(he, torch.zeros_like(he), mask)["logits"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strategy", ["cmgan", "feature_substitution"])
def test_gradients_reach_trainable_params_only(strategy):
    # Forced freezing of random stages (the test needs frozen stages without a weights file): it warns.
    with pytest.warns(UserWarning, match="randomly initialised"):
        net = _small_net(
            strategy, specific_backbone="efficientnet-b0" if strategy == "cmgan" else "resnet10", hybrid_unfreezing=True
        ).train()
    frozen_before = {
        k: v.clone()
        for k, v in net.encoder.shared.resnet.state_dict().items()
        if k.split(".")[0] in DEFAULT_FROZEN_STAGES
    }
    he, ihc, mask = _batch(MASKS["mixed"] + [[1, 1]])
    out = net(he, ihc, mask)
    loss = HER2Loss()(out, torch.tensor([0, 1, 2, 3]), mask)["loss"]
    loss.backward()
    trainable = dict(net.named_parameters())
    no_grad = [n for n, p in trainable.items() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    frozen = [n for n, p in trainable.items() if not p.requires_grad]
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    frozen_stages = {n.split(".")[3] for n in frozen if n.startswith("encoder.shared.resnet.")}
    assert frozen_stages == set(DEFAULT_FROZEN_STAGES)
    assert any(n.startswith("encoder.shared.resnet.layer3") for n in trainable if trainable[n].requires_grad)
    if strategy == "cmgan":
        assert all(not p.requires_grad for p in net.cmgan.parameters())
        assert not net.cmgan.training
        assert {n for n in frozen if n.startswith("cmgan.")} == {"cmgan." + n for n, _ in net.cmgan.named_parameters()}
    # Frozen stages' BatchNorm stayed in eval mode: running statistics did not move in a train-mode forward.
    for key, value in frozen_before.items():
        torch.testing.assert_close(net.encoder.shared.resnet.state_dict()[key], value)
    assert not net.encoder.shared.resnet.layer1[0].bn1.training
    assert net.encoder.shared.resnet.layer3[0].bn1.training


def test_hybrid_unfreezing_off_trains_everything_and_bad_stage_raises():
    net = _small_net("feature_substitution", hybrid_unfreezing=False)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="layer9"):
        freeze_resnet_stages(resnet18(spatial_dims=2), ("conv1", "layer9"))


def test_hybrid_unfreezing_auto_freezes_only_pretrained_stages():
    # The default, "auto", without pretrained weights: a random stem must learn, so nothing is frozen (and no warning).
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*randomly initialised")
        net = _small_net("feature_substitution")
    assert net.encoder.hybrid_unfreezing is False
    assert all(p.requires_grad for p in net.parameters()) and net.encoder.shared.frozen_stages == []
    # The rule itself, as the bundle's command line passes it (strings).
    assert resolve_hybrid_unfreezing("auto", pretrained=True) is True
    assert resolve_hybrid_unfreezing(" AUTO ", pretrained=False) is False
    assert resolve_hybrid_unfreezing("false", pretrained=True) is False
    assert resolve_hybrid_unfreezing(True, pretrained=True) is True
    with pytest.warns(UserWarning, match="hybrid_unfreezing='auto'"):
        assert resolve_hybrid_unfreezing("true", pretrained=False) is True
    with pytest.raises(ValueError, match="'auto', true or false, got 'sometimes'"):
        resolve_hybrid_unfreezing("sometimes", pretrained=True)


def test_dao_identical_shared_features_zero_else_positive():
    a = torch.randn(4, 16, 2, 2, requires_grad=True)
    b = a.detach() + 0.5 * torch.randn(4, 16, 2, 2)
    for mode in ("l1", "mmd"):
        for pooled in (True, False):
            loss = DomainAlignmentLoss(mode, pooled=pooled)
            assert loss(a, a.detach().clone()).item() == pytest.approx(0.0, abs=1e-6)
            assert loss(a, b).item() > 1e-3
    # Only selected samples count.
    c = a.detach().clone()
    c[0] += 10.0
    keep = torch.tensor([False, True, True, True])
    assert DomainAlignmentLoss("l1")(a, c, keep).item() == pytest.approx(0.0, abs=1e-6)
    assert DomainAlignmentLoss("l1")(a, c).item() > 1.0


def test_mmd_detects_a_distribution_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    same = torch.randn(16, 8, generator=g)
    shifted = torch.randn(16, 8, generator=g) + 2.0
    assert gaussian_mmd(x, shifted) > 3 * gaussian_mmd(x, same)


@pytest.mark.parametrize("mode", ["l1", "mmd"])
def test_losses_zero_with_graph_when_no_sample_qualifies(mode):
    a = torch.randn(3, 8, 2, 2, requires_grad=True)
    none = torch.zeros(3, dtype=torch.bool)
    dao = DomainAlignmentLoss(mode)(a, a * 2, none)
    logits = torch.randn(3, 2, requires_grad=True)
    dco = DomainClassificationLoss()([logits, logits * 2], none)
    for value, leaf in ((dao, a), (dco, logits)):
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
        assert leaf.grad is not None and leaf.grad.abs().sum() == 0


def test_her2_loss_follows_the_mask_and_its_sample_rule():
    net = _small_net("feature_substitution").eval()
    he, _, _ = _batch(MASKS["dual"])
    label = torch.tensor([0, 1, 2])
    with torch.no_grad():
        same = net(he, he.clone(), torch.ones(3, 2))
        diff = net(*_batch(MASKS["dual"], seed=1))
    mask = torch.ones(3, 2)
    loss = HER2Loss()
    assert loss(same, label, mask)["dao"].item() == pytest.approx(0.0, abs=1e-6)
    terms = loss(diff, label, mask)
    assert set(terms) == {"loss", "ce", "dao", "dco"} and terms["dao"].item() > 0
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["dao"] + terms["dco"])
    torch.testing.assert_close(terms["ce"], F.cross_entropy(diff["logits"], label))
    single = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert loss(diff, label, single)["dao"].item() == 0.0 and loss(diff, label, single)["dco"].item() == 0.0
    with torch.no_grad():
        out = net(*_batch([[1, 0], [0, 1], [1, 0]]))
    real = HER2Loss(auxiliary_samples="real")(out, label, single)
    assert real["dao"].item() == 0.0 and real["dco"].item() > 0
    # Class weights and unlabelled samples (label -1) are the loss's rules, not the trainer's.
    weighted = HER2Loss(class_weights=[1.0, 2.0, 3.0, 4.0])(diff, torch.tensor([0, -1, 2]), mask)
    expected = F.cross_entropy(diff["logits"][[0, 2]], torch.tensor([0, 2]), weight=torch.tensor([1.0, 2, 3, 4]))
    torch.testing.assert_close(weighted["ce"], expected)
    nothing = HER2Loss()(diff, torch.tensor([-1, -1, -1]), mask)
    assert nothing["ce"].item() == 0.0
    with pytest.raises(KeyError, match="shared_he"):
        loss({"logits": diff["logits"]}, label, mask)
    with pytest.raises(ValueError, match="auxiliary_samples"):
        HER2Loss(auxiliary_samples="some")


def test_dco_decreases_when_specific_features_separate_the_stains():
    net = _small_net("feature_substitution")
    classifier = net.encoder.stain_classifier
    dco = DomainClassificationLoss()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, net.encoder.specific_channels, 2, 2, generator=g)
    separated = [base + 1.0, base - 1.0]
    mixed = [base, base.clone()]

    def loss_of(features):
        return dco(net.encoder.stain_logits(features))

    # Identical specific features cannot be told apart: DCO is at least ln 2 whatever the classifier.
    opt = torch.optim.SGD(classifier.parameters(), lr=0.5)
    start = loss_of(separated).item()
    for _ in range(20):
        opt.zero_grad()
        loss_of(separated).backward()
        opt.step()
    assert loss_of(separated).item() < 0.5 * start
    assert loss_of(separated).item() < 0.1
    assert loss_of(mixed).item() >= torch.log(torch.tensor(2.0)).item() - 1e-5


def test_attention_weights_in_unit_interval_and_stain_means():
    net = _small_net("cmgan").eval()
    with torch.no_grad():
        out = net(*_batch(MASKS["mixed"]))
    for key in ("channel_attention", "spatial_attention", "stain_attention"):
        assert ((out[key] > 0) & (out[key] < 1)).all(), key
    cw = out["channel_attention"]
    torch.testing.assert_close(out["stain_attention"], torch.stack([cw[:, :64].mean(1), cw[:, 64:].mean(1)], 1))


def test_attention_module_applies_its_weights_and_keeps_stain_blocks_separate():
    torch.manual_seed(0)
    att = ModalitySensitiveAttention(in_channels=8, num_stains=2, compressed_channels=4, reduction=2).eval()
    x = torch.randn(2, 16, 3, 3)
    y, cw, sw = att(x)
    torch.testing.assert_close(y, att.compress(x) * cw[:, :, None, None] * sw)
    # Changing only the IHC half leaves the compressed H&E block untouched (grouped compression).
    x2 = x.clone()
    x2[:, 8:] += 1.0
    torch.testing.assert_close(att.compress(x2)[:, :4], att.compress(x)[:, :4])
    no_spatial = ModalitySensitiveAttention(8, compressed_channels=4, spatial_attention=False).eval()
    assert no_spatial(x)[2] is None
    with pytest.raises(ValueError, match="16"):
        att(torch.randn(2, 15, 3, 3))
    net = _small_net("feature_substitution", spatial_attention=False).eval()
    with torch.no_grad():
        assert torch.equal(net(*_batch(MASKS["dual"]))["spatial_attention"], torch.ones(3, 1, 2, 2))


def test_input_validation_errors():
    net = _small_net("feature_substitution").eval()
    he, ihc, mask = _batch(MASKS["dual"])
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        net(he, ihc, torch.ones(3, 3))
    with pytest.raises(ValueError, match="neither"):
        net(he, ihc, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="3, H, W"):
        net(he[:, :2], ihc[:, :2], mask)
    with pytest.raises(ValueError, match="same shape"):
        net(he, ihc[..., :32], mask)
    with pytest.raises(ValueError, match="0 .missing. and 1"):
        net(he, ihc, mask * 0.5)
    with pytest.raises(ValueError, match="ihc is None"):
        net(he, None, mask)
    with pytest.raises(ValueError, match="CrossModalGAN"):
        HER2FlexibleNet(shared_backbone="resnet18", missing_strategy="cmgan")
    with pytest.raises(ValueError, match="missing_strategy"):
        HER2FlexibleNet(shared_backbone="resnet18", missing_strategy="drop")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_encoder("mobilenet")


def test_channels_last_matches_nchw():
    ref = _small_net("feature_substitution", seed=3).eval()
    fast = _small_net("feature_substitution", seed=3, channels_last=True).eval()
    fast.load_state_dict(ref.state_dict())
    batch = _batch(MASKS["mixed"])
    with torch.no_grad():
        torch.testing.assert_close(fast(*batch)["logits"], ref(*batch)["logits"], atol=1e-4, rtol=1e-4)
    assert fast.encoder.shared.resnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_efficientnet_trunk_has_no_dead_parameters():
    trunk = EfficientNetTrunk("efficientnet-b0")
    y = trunk(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, trunk.out_channels, 2, 2) and trunk.out_channels == 320
    y.mean().backward()
    assert all(p.grad is not None for p in trunk.parameters())


# --------------------------------------------------------------------------------------------- pretrained weights
def _torchvision_style_state_dict(seed: int = 0) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """A torchvision-named ResNet18 state dict made from a MONAI model's own weights (no download)."""
    torch.manual_seed(seed)
    source = resnet18(spatial_dims=2, conv1_t_stride=2, shortcut_type="B", bias_downsample=False, num_classes=1000)
    # MONAI's ResNet uses torchvision's names, so the rename is the identity; the check below pins that assumption
    # to real torchvision resnet18 key names.
    state = {key: value.clone() for key, value in source.state_dict().items()}
    torchvision_keys = {
        "conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight", "fc.weight",
        "fc.bias",
    }  # fmt: skip
    assert torchvision_keys <= set(state)
    assert len(state) == 122  # torchvision resnet18().state_dict() has 122 entries
    return state, source


def test_load_pretrained_resnet_success(tmp_path):
    state, source = _torchvision_style_state_dict()
    path = tmp_path / "resnet18_tv.pth"
    torch.save(state, path)
    trunk = ResNetTrunk("resnet18")
    report = load_pretrained_resnet(trunk.resnet, path)
    assert report["ignored"] == ["fc.bias", "fc.weight"]
    for key, value in trunk.resnet.state_dict().items():
        assert torch.equal(value, state[key]), key
    # MONAI's default shortcut has a bias torchvision lacks: zero-filled, so the network computes the same function.
    biased = resnet18(spatial_dims=2, conv1_t_stride=2, feed_forward=False)
    report = load_pretrained_resnet(biased, path)
    assert report["zero_filled"] and all(biased.state_dict()[k].abs().sum() == 0 for k in report["zero_filled"])
    source.eval(), biased.eval(), trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.avgpool(trunk(x)).flatten(1)
        torch.testing.assert_close(biased(x), expected)
    # Through the classifier's config key.
    net = HER2FlexibleNet(shared_backbone="resnet18", pretrained_weights=str(path))
    assert torch.equal(net.encoder.shared.resnet.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert not net.encoder.shared.resnet.layer1[0].conv1.weight.requires_grad


def test_train_json_freezes_the_stem_only_when_it_is_pretrained(tmp_path):
    architecture = {k: TINY_TRAINING[k] for k in ("image_size", "shared_backbone", "specific_backbone")}
    architecture["shared_backbone"] = "resnet18"
    architecture["bundle_root"] = str(tmp_path)  # the network's record reads the datalist: not the user's
    demo = bundle_component("train.json", "network_def", **architecture)
    assert demo.encoder.shared.frozen_stages == []
    assert all(p.requires_grad for p in demo.encoder.parameters())
    state, _ = _torchvision_style_state_dict()
    path = tmp_path / "resnet18_tv.pth"
    torch.save(state, path)
    pretrained = bundle_component("train.json", "network_def", pretrained_weights=str(path), **architecture)
    assert pretrained.encoder.shared.frozen_stages == list(DEFAULT_FROZEN_STAGES)
    assert not pretrained.encoder.shared.resnet.layer2[0].conv1.weight.requires_grad
    assert pretrained.encoder.shared.resnet.layer3[0].conv1.weight.requires_grad
    forced_off = bundle_component(
        "train.json", "network_def", pretrained_weights=str(path), hybrid_unfreezing="false", **architecture
    )
    assert forced_off.encoder.shared.frozen_stages == []


def test_load_pretrained_resnet_errors(tmp_path):
    state, _ = _torchvision_style_state_dict()
    missing = {k: v for k, v in state.items() if k != "layer3.0.conv1.weight"}
    with pytest.raises(KeyError, match=r"missing key.*layer3\.0\.conv1\.weight"):
        load_pretrained_resnet(ResNetTrunk("resnet18").resnet, missing)
    bad_shape = dict(state)
    bad_shape["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(bad_shape, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\)"):
        load_pretrained_resnet(ResNetTrunk("resnet18").resnet, path)
    with pytest.raises(StateDictMismatchError, match="unexpected key"):
        load_pretrained_resnet(ResNetTrunk("resnet10").resnet, state)
    with pytest.raises(FileNotFoundError):
        load_pretrained_resnet(ResNetTrunk("resnet18").resnet, tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------------------------- deploy
class _MeanColourSelector(nn.Module):
    """Deterministic stand-in for the branch selector: IHC when the red channel is darker than the blue one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x[:, 2].mean(dim=(1, 2)) - x[:, 0].mean(dim=(1, 2))
        return torch.stack([-score, score], dim=1)


def _trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, example, check_trace=False)


# The TorchScript profiling executor re-optimises the graph on the first calls (seconds on 2 busy cores); the
# numerical comparison below does not depend on it.
@torch.jit.optimized_execution(False)
def test_deploy_wrapper_traces_and_routes():
    net = _small_net("cmgan").eval()  # ResNet10 specific trunks: a 4x smaller graph to trace than EfficientNet
    net.selector = _MeanColourSelector()
    deploy = HER2Deploy(net).eval()
    size = 32
    x = torch.rand(4, 3, size, size) * 2 - 1
    x[:2, 0] += 0.5  # red-ish: routed to H&E
    x[2:, 2] += 0.5  # blue-ish: routed to IHC
    traced = _trace(deploy, x[[0, 2]])
    with torch.no_grad():
        eager = deploy(x)
        # Another batch size and routing than at trace time; the traced CM-GAN path is dense, the eager one sparse.
        torch.testing.assert_close(traced(x), eager)
        torch.testing.assert_close(traced(x[[3, 2, 0]]), eager[[3, 2, 0]])
        mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        direct = net(x * mask[:, :1, None, None], x * mask[:, 1:, None, None], mask)["logits"]
    torch.testing.assert_close(eager, direct)
    dual = torch.rand(2, 6, size, size) * 2 - 1
    traced_dual = _trace(deploy, dual)
    with torch.no_grad():
        torch.testing.assert_close(traced_dual(dual), deploy(dual))
        torch.testing.assert_close(deploy(dual), net(dual[:, :3], dual[:, 3:], torch.ones(2, 2))["logits"])
    with pytest.raises(ValueError, match="6, H, W"):
        deploy(torch.rand(1, 4, size, size))


@torch.jit.optimized_execution(False)
def test_deploy_wrapper_with_branch_selector():
    selector = BranchSelector().eval()
    net = _small_net("feature_substitution", selector=selector).eval()
    deploy = HER2Deploy(net).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    traced = _trace(deploy, x)
    with torch.no_grad():
        out = deploy(x)
        assert out.shape == (3, NUM_CLASSES)
        torch.testing.assert_close(traced(x), out)
        he, ihc, mask = route_unknown_stains(x, selector.predict_stain(x) == 1)
        torch.testing.assert_close(out, net(he, ihc, mask)["logits"])
    # The deploy module adds no weights: its state dict is the classifier's, so a model file loads into either.
    assert deploy.state_dict().keys() == net.state_dict().keys()
    other = HER2Deploy(_small_net("feature_substitution", seed=5, selector=BranchSelector())).eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), out)
    other.net.selector = None
    with pytest.raises(ValueError, match="no branch selector"):
        other(x)
