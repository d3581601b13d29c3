"""Tests for the alternative missing-modality classifiers: SimMLM (mixture of experts + MoFe) and MoRA (adapters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from her2_monai.constants import DUAL, HE_ONLY, IHC_ONLY, NUM_CLASSES
from her2_monai.losses import ClassificationLoss, SimMLMLoss
from her2_monai.losses.mofe import MoFeLoss
from her2_monai.networks.alternatives import MoRANet, ScenarioLowRankAdapter, SimMLMNet, mixture_logits
from her2_monai.networks.encoders import ResNetTrunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"arch": "resnet10", "block_inplanes": (4, 8, 8, 16)}
SIZE = 64  # the last stage is 2x2 at 64 px, so BatchNorm can train even on a one-sample subset

MASKS = {
    "dual": ([[1.0, 1.0]] * 3, [DUAL] * 3),
    "he_only": ([[1.0, 0.0]] * 3, [HE_ONLY] * 3),
    "ihc_only": ([[0.0, 1.0]] * 3, [IHC_ONLY] * 3),
    "mixed": ([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], [DUAL, HE_ONLY, IHC_ONLY]),
}


def _batch(mask: list[list[float]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.tensor(mask)
    he = torch.rand(len(mask), 3, SIZE, SIZE, generator=gen) * 2 - 1
    ihc = torch.rand(len(mask), 3, SIZE, SIZE, generator=gen) * 2 - 1
    return he * m[:, 0, None, None, None], ihc * m[:, 1, None, None, None], m


def _make(cls: type, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(**TINY, **kwargs)


@pytest.mark.parametrize("cls", [SimMLMNet, MoRANet])
@pytest.mark.parametrize("case", sorted(MASKS))
def test_output_shapes_per_scenario(cls: type, case: str) -> None:
    mask, scenarios = MASKS[case]
    model = _make(cls).eval()
    he, ihc, m = _batch(mask)
    with torch.no_grad():
        out = model(he, ihc, m)
    assert out["logits"].shape == (3, NUM_CLASSES)
    assert torch.isfinite(out["logits"]).all()
    assert out["scenario"].tolist() == scenarios
    assert out["features"].shape[:2] == (3, 2)
    if cls is SimMLMNet:
        assert out["gate_weights"].shape == (3, 2)
        assert out["expert_logits"].shape == (3, 2, NUM_CLASSES)


@pytest.mark.parametrize("cls", [SimMLMNet, MoRANet])
def test_missing_stain_pixels_are_ignored(cls: type) -> None:
    """Whatever sits in a missing stain's slot must not change the prediction."""
    model = _make(cls).eval()
    he, ihc, m = _batch(MASKS["mixed"][0])
    noisy_he, noisy_ihc = he.clone(), ihc.clone()
    noisy_he[2] = torch.randn_like(he[2])  # sample 2 has no H&E
    noisy_ihc[1] = torch.randn_like(ihc[1])  # sample 1 has no IHC
    with torch.no_grad():
        a = model(he, ihc, m)["logits"]
        b = model(noisy_he, noisy_ihc, m)["logits"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [SimMLMNet, MoRANet])
def test_none_for_a_wholly_missing_stain(cls: type) -> None:
    model = _make(cls).eval()
    he, ihc, m = _batch(MASKS["ihc_only"][0])
    with torch.no_grad():
        torch.testing.assert_close(model(None, ihc, m)["logits"], model(he, ihc, m)["logits"])
    with pytest.raises(ValueError, match="he is None"):
        model(None, ihc, torch.ones(3, 2))


@pytest.mark.parametrize("cls", [SimMLMNet, MoRANet])
def test_bad_inputs_raise_clear_errors(cls: type) -> None:
    model = _make(cls).eval()
    he, ihc, m = _batch(MASKS["dual"][0])
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(he, ihc, torch.ones(3, 3))
    with pytest.raises(ValueError, match="0 \\(missing\\) and 1"):
        model(he, ihc, torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="neither H&E nor IHC"):
        model(he, ihc, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="batch size mismatch"):
        model(he, ihc, torch.ones(2, 2))
    with pytest.raises(ValueError, match="3 RGB channels"):
        model(he[:, :1], ihc[:, :1], m)
    with pytest.raises(ValueError, match="same shape"):
        model(he, ihc[..., :32, :32], m)


# ------------------------------------------------------------------------------------------------------------ SimMLM
def test_gate_weights_zero_for_missing_and_sum_to_one() -> None:
    model = _make(SimMLMNet).eval()
    he, ihc, m = _batch(MASKS["mixed"][0])
    with torch.no_grad():
        out = model(he, ihc, m)
    w = out["gate_weights"]
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert w[1, 1] == 0 and w[2, 0] == 0
    assert 0 < w[0, 0] < 1 and 0 < w[0, 1] < 1
    # A single-stain sample's prediction is exactly its expert's prediction.
    torch.testing.assert_close(out["logits"][1], out["expert_logits"][1, 0])
    torch.testing.assert_close(out["logits"][2], out["expert_logits"][2, 1])
    expected_dual = (w[0, :, None] * out["expert_logits"][0]).sum(dim=0)
    torch.testing.assert_close(out["logits"][0], expected_dual)


def test_mixture_with_one_expert_masked_equals_that_expert() -> None:
    expert_logits = torch.randn(5, 2, NUM_CLASSES)
    gate_logits = torch.randn(5, 2)
    for column in (0, 1):
        only = torch.zeros(5, 2)
        only[:, column] = 1
        logits, weights = mixture_logits(expert_logits, gate_logits, only)
        torch.testing.assert_close(logits, expert_logits[:, column])
        torch.testing.assert_close(weights, only)


def test_mofe_zero_when_dual_already_better_positive_otherwise() -> None:
    loss = MoFeLoss()
    target = torch.tensor([0, 2])
    confident = F.one_hot(target, NUM_CLASSES).float() * 5.0
    vague = torch.zeros(2, 2, NUM_CLASSES)
    assert loss(confident, vague, target).item() == 0.0
    worse = -confident
    value = loss(worse, vague, target)
    expected = (F.cross_entropy(worse, target, reduction="none") - torch.log(torch.tensor(4.0))).mean()
    assert value.item() > 0
    torch.testing.assert_close(value, expected)
    # Mixed: only the samples/views where "more" loses contribute.
    mixed_more = torch.stack([confident[0], worse[1]])
    assert 0 < loss(mixed_more, vague, target).item() < value.item()
    assert MoFeLoss(margin=1.0)(confident, confident.unsqueeze(1), target).item() == pytest.approx(1.0)


def test_mofe_gradients_and_errors() -> None:
    target = torch.tensor([1, 3])
    more = torch.zeros(2, NUM_CLASSES, requires_grad=True)
    fewer = torch.randn(2, 2, NUM_CLASSES).mul(3).requires_grad_(True)
    fewer_good = fewer.detach().clone()
    fewer_good[torch.arange(2), :, target] = 20.0  # fewer-modality views are much better -> hinge active
    fewer_good.requires_grad_(True)
    MoFeLoss()(more, fewer_good, target).backward()
    assert more.grad is not None and more.grad.abs().sum() > 0
    assert fewer_good.grad is None  # detached by default
    fewer_good.grad = None
    MoFeLoss(detach_fewer=False)(more, fewer_good, target).backward()
    assert fewer_good.grad is not None and fewer_good.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="margin"):
        MoFeLoss(margin=-0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        MoFeLoss()(more, fewer, torch.tensor([1]))
    assert MoFeLoss()(more[:0], fewer[:0], target[:0]).item() == 0.0


def test_simmlm_loss() -> None:
    model = _make(SimMLMNet).train()
    he, ihc, m = _batch(MASKS["mixed"][0])
    label = torch.tensor([0, 1, 2])
    out = model(he, ihc, m)
    terms = SimMLMLoss()(out, label, m)
    aux = {"mofe": terms["mofe"]}
    assert set(terms) == {"loss", "ce", "mofe"} and aux["mofe"].ndim == 0
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["mofe"])
    # The single-stain views of a dual sample are the mixture with one expert masked, i.e. each expert's logits.
    dual = torch.stack(
        [
            mixture_logits(out["expert_logits"][:1], out["gate_logits"][:1], only)[0]
            for only in (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        ],
        dim=1,
    )
    expected = 0.1 * MoFeLoss()(out["logits"][:1], dual, label[:1])
    torch.testing.assert_close(aux["mofe"], expected)
    assert SimMLMLoss()(out, torch.full((3,), -1), m)["mofe"].item() == 0.0  # unlabelled samples do not rank
    single_m = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    single_out = model(he, ihc, single_m)
    assert SimMLMLoss()(single_out, label, single_m)["mofe"].item() == 0.0
    with pytest.raises(ValueError, match="mofe_weight"):
        SimMLMLoss(mofe_weight=-1.0)
    # Experts that disagree make the mixture worse than the better single expert, so at init the hinge is active and
    # its gradient reaches the gate.
    assert aux["mofe"].item() > 0
    model.zero_grad()
    aux["mofe"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate.parameters())


def test_simmlm_learns_a_tiny_batch() -> None:
    model = _make(SimMLMNet)
    he, ihc, m = _batch(MASKS["mixed"][0] * 2, seed=1)
    label = torch.tensor([0, 1, 2, 3, 1, 2])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(he, ihc, m)
        loss = SimMLMLoss()(out, label, m)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -------------------------------------------------------------------------------------------------------------- MoRA
def test_mora_up_projections_zero_init_equals_backbone_path() -> None:
    model = _make(MoRANet).eval()
    for adapter in model.adapters.values():
        assert adapter.up.abs().sum() == 0
        assert adapter.down.abs().sum() > 0
        assert adapter.down.shape[0] == 4
    he, ihc, m = _batch(MASKS["mixed"][0])
    scenario = torch.tensor([DUAL, HE_ONLY, IHC_ONLY])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(he, scenario), model.encode(he, scenario, adapt=False))
        plain_he = model.encode(he[:1], scenario[:1], adapt=False)[0]
        plain_ihc = model.encode(ihc[:1], scenario[:1], adapt=False)[0]
        logits = model(he, ihc, m)["logits"][0]
        torch.testing.assert_close(logits, model.head(torch.cat([plain_he, plain_ihc])))


def test_mora_scenario_selects_up_projection() -> None:
    model = _make(MoRANet).eval()
    with torch.no_grad():
        model.adapters["4"].up[HE_ONLY].normal_()
    he, _, _ = _batch(MASKS["dual"][0])
    with torch.no_grad():
        base = model.encode(he, torch.full((3,), DUAL), adapt=False)
        dual = model.encode(he, torch.full((3,), DUAL))
        he_only = model.encode(he, torch.full((3,), HE_ONLY))
    torch.testing.assert_close(dual, base)
    assert (he_only - base).abs().max() > 1e-4


def test_lowrank_adapter_errors() -> None:
    adapter = ScenarioLowRankAdapter(8, rank=4)
    with pytest.raises(ValueError, match="scenario ids"):
        adapter(torch.zeros(2, 8, 3, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        adapter(torch.zeros(2, 8, 3, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="positive"):
        ScenarioLowRankAdapter(8, rank=0)


@pytest.mark.parametrize("freeze", ["all", "early"])
def test_mora_gradients_reach_only_trainable_parts(freeze: str) -> None:
    model = _make(MoRANet, freeze=freeze).train()
    net = model.backbone.resnet
    assert not net.layer1.training and not net.bn1.training  # frozen BatchNorm stays in eval mode
    running = net.bn1.running_mean.clone()
    he, ihc, m = _batch(MASKS["mixed"][0])
    out = model(he, ihc, m)
    terms = ClassificationLoss()(out, torch.tensor([0, 1, 2]), m)
    assert set(terms) == {"loss", "ce"}
    terms["loss"].backward()
    torch.testing.assert_close(net.bn1.running_mean, running)
    frozen = [net.conv1, net.bn1, net.layer1, net.layer2] + ([net.layer3, net.layer4] if freeze == "all" else [])
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    if freeze == "early":
        assert all(p.grad is not None for p in net.layer4.parameters())
    for adapter in model.adapters.values():
        # Only the up-projections of scenarios present in the batch (all three here) receive gradient.
        assert adapter.up.grad is not None and (adapter.up.grad.abs().sum(dim=(1, 2)) > 0).all()
        assert adapter.down.grad is not None  # zero at init because every up-projection is still zero
    assert model.head[1].weight.grad.abs().sum() > 0
    assert model.missing_token.grad is not None and model.missing_token.grad.abs().sum() > 0


def test_mora_options_validated() -> None:
    with pytest.raises(ValueError, match="freeze"):
        MoRANet(**TINY, freeze="half")
    with pytest.raises(ValueError, match="missing_feature"):
        MoRANet(**TINY, missing_feature="mean")
    with pytest.raises(ValueError, match="adapter_stages"):
        MoRANet(**TINY, adapter_stages=(0, 5))
    model = MoRANet(**TINY, missing_feature="zeros", adapter_stages=(3,))
    assert list(model.adapters) == ["3"]
    assert "missing_token" not in dict(model.named_parameters())


# ------------------------------------------------------------------------------------------------------------- trunk
def test_trunk_pretrained_weights(tmp_path) -> None:
    torch.manual_seed(1)
    trunk = {"name": TINY["arch"], "block_inplanes": TINY["block_inplanes"]}
    source = ResNetTrunk(**trunk)
    state = {**source.resnet.state_dict(), "fc.weight": torch.zeros(10, 16), "fc.bias": torch.zeros(10)}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    loaded = ResNetTrunk(**trunk, pretrained_weights=path)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, path)
    with pytest.raises(KeyError, match="layer4"):
        ResNetTrunk(**trunk, pretrained_weights=path)
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape"):
        ResNetTrunk(name="resnet10", block_inplanes=(8, 8, 8, 16), pretrained_weights=path)
    with pytest.raises(FileNotFoundError):
        ResNetTrunk(**trunk, pretrained_weights=tmp_path / "absent.pt")
    # MoRA's default freezing: the whole backbone when real weights are loaded, stages 3-4 trainable otherwise.
    assert MoRANet(**TINY, pretrained_weights=path).freeze == "all"
    assert MoRANet(**TINY).freeze == "early"
    with pytest.raises(ValueError, match="unknown ResNet backbone"):
        ResNetTrunk(name="resnet7")
