"""Tests of the CM-GAN parts: Pyramid-Pix2Pix generator, PatchGAN discriminator, pyramid/GAN losses, CrossModalGAN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

from her2_monai.losses.adversarial import GANLoss
from her2_monai.losses.pyramid import GaussianPyramid, PyramidL1Loss
from her2_monai.networks.cmgan import CrossModalDiscriminators, CrossModalGAN
from her2_monai.networks.factory import frozen_cmgan
from her2_monai.networks.pix2pix import PatchGANDiscriminator, PyramidPix2PixGenerator
from her2_monai.networks.record import ArchitectureMismatchError

#: Parameter count pix2pix/CycleGAN report for ``resnet_9blocks`` (3 -> 3 channels, ngf 64, InstanceNorm).
REF_RESNET9_INSTANCE = 11_378_179


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_cmgan(**kwargs) -> CrossModalGAN:
    torch.manual_seed(0)
    return CrossModalGAN(ngf=4, n_blocks=1, **kwargs)


# --------------------------------------------------------------------------------------------------- reference nets
def reference_resnet_generator(ngf: int, n_blocks: int) -> nn.Sequential:
    """Plain-torch pix2pix ResNet generator with explicit ReflectionPad2d layers (BatchNorm, no dropout)."""

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.ReflectionPad2d(1),
                nn.Conv2d(c, c, 3, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.ReflectionPad2d(1),
                nn.Conv2d(c, c, 3, bias=False),
                nn.BatchNorm2d(c),
            )

        def forward(self, x):
            return x + self.body(x)

    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=False), nn.BatchNorm2d(ngf), nn.ReLU()]
    c = ngf
    for _ in range(2):
        layers += [nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU()]
        c *= 2
    layers += [Block(c) for _ in range(n_blocks)]
    for _ in range(2):
        layers += [
            nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(),
        ]
        c //= 2
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh()]
    return nn.Sequential(*layers)


def reference_patchgan(ndf: int) -> nn.Sequential:
    """Plain-torch pix2pix NLayerDiscriminator, n_layers 3, BatchNorm, 6 input channels."""
    lrelu = nn.LeakyReLU(0.2)
    return nn.Sequential(
        nn.Conv2d(6, ndf, 4, 2, 1),
        lrelu,
        nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(2 * ndf),
        lrelu,
        nn.Conv2d(2 * ndf, 4 * ndf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(4 * ndf),
        lrelu,
        nn.Conv2d(4 * ndf, 8 * ndf, 4, 1, 1, bias=False),
        nn.BatchNorm2d(8 * ndf),
        lrelu,
        nn.Conv2d(8 * ndf, 1, 4, 1, 1),
    )


def copy_state_in_order(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and buffers by position (same layer order, different names)."""
    src_t, dst_t = list(src.state_dict().values()), list(dst.state_dict().values())
    assert len(src_t) == len(dst_t)
    with torch.no_grad():
        for s, d in zip(src_t, dst_t):
            assert s.shape == d.shape
            d.copy_(s)


# --------------------------------------------------------------------------------------------------------- generator
def test_generator_parameter_counts_match_pix2pix():
    assert n_params(PyramidPix2PixGenerator(norm="instance")) == REF_RESNET9_INSTANCE
    # BatchNorm (the paper's choice) adds weight + bias per normalised channel but drops the conv bias: +1 per channel
    # of every normalised layer: in-conv ngf, downs 2 ngf + 4 ngf, 9 blocks x 2 x 4 ngf, ups 2 ngf + ngf.
    ngf = 64
    bn_extra = ngf + 2 * ngf + 4 * ngf + 9 * 2 * 4 * ngf + 2 * ngf + ngf
    assert n_params(PyramidPix2PixGenerator()) == REF_RESNET9_INSTANCE + bn_extra == 11_383_427


def test_generator_equals_reference_with_explicit_reflection_pads():
    torch.manual_seed(0)
    gen = PyramidPix2PixGenerator(ngf=8, n_blocks=2, use_dropout=False).eval()
    ref = reference_resnet_generator(ngf=8, n_blocks=2).eval()
    copy_state_in_order(gen, ref)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gen(x), ref(x), rtol=1e-5, atol=1e-6)


def test_generator_shapes_range_and_dropout():
    torch.manual_seed(0)
    gen = PyramidPix2PixGenerator(in_channels=1, out_channels=3, ngf=8, n_blocks=2)
    x = torch.randn(2, 1, 32, 48) * 3
    y = gen(x)
    assert y.shape == (2, 3, 32, 48)
    assert y.min() >= -1 and y.max() <= 1
    assert any(isinstance(m, nn.Dropout) for m in gen.modules())
    assert not any(isinstance(m, nn.Dropout) for m in PyramidPix2PixGenerator(ngf=8, use_dropout=False).modules())
    gen.eval()
    with torch.no_grad():
        torch.testing.assert_close(gen(x), gen(x))
    inst = PyramidPix2PixGenerator(ngf=8, n_blocks=1, norm="instance")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in inst.modules())
    assert inst(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_generator_bad_input():
    gen = PyramidPix2PixGenerator(ngf=4, n_blocks=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        gen(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        gen(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        gen(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="norm"):
        PyramidPix2PixGenerator(norm="group")
    with pytest.raises(ValueError, match="n_blocks"):
        PyramidPix2PixGenerator(n_blocks=-1)


# ----------------------------------------------------------------------------------------------------- discriminator
def test_discriminator_parameter_count():
    ndf, c_in = 64, 6
    expected = (c_in * ndf * 16 + ndf) + 8193  # first conv with bias; last conv 8 ndf -> 1 with bias
    for c_prev, c in ((ndf, 2 * ndf), (2 * ndf, 4 * ndf), (4 * ndf, 8 * ndf)):
        expected += c_prev * c * 16 + 2 * c  # conv without bias + BatchNorm affine
    assert n_params(PatchGANDiscriminator()) == expected == 2_768_705
    # InstanceNorm (no affine) puts the bias back on the conv: one parameter per channel less.
    assert n_params(PatchGANDiscriminator(norm="instance")) == expected - (2 + 4 + 8) * ndf


def test_discriminator_equals_pix2pix_layout_and_patch_size():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(ndf=8).eval()
    ref = reference_patchgan(ndf=8).eval()
    copy_state_in_order(disc, ref)
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        out = disc(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
        feats = disc.features(x)
    assert out.shape == (2, 1, 6, 6)  # 64 / 8 - 2
    assert len(feats) == 5 and torch.equal(feats[-1], out)
    # receptive field: a change in one input pixel at (0, 0) only reaches logits whose 70x70 window covers it.
    x2 = x.clone()
    x2[:, :, 0, 0] += 10.0
    with torch.no_grad():
        changed = (disc(x2) - out).abs().sum(dim=(0, 1)) > 0
    assert changed[0, 0] and not changed[-1, -1]


def test_discriminator_bad_input():
    disc = PatchGANDiscriminator(ndf=4)
    with pytest.raises(ValueError, match="concatenated"):
        disc(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=">= 24"):
        disc(torch.zeros(1, 6, 16, 16))
    with pytest.raises(ValueError, match="n_layers"):
        PatchGANDiscriminator(n_layers=5)


# ------------------------------------------------------------------------------------------------------ pyramid loss
def manual_half_level(x: torch.Tensor, blurs: int = 4) -> torch.Tensor:
    """1/2 pyramid level written out: ``blurs`` x (3x3 Gaussian, sigma 1, reflect border), then every 2nd pixel."""
    g = [math.exp(-0.5), 1.0, math.exp(-0.5)]
    g = torch.tensor([v / sum(g) for v in g])
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 3, 3)
    for _ in range(blurs):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])
    return x[:, :, ::2, ::2]


def test_pyramid_loss_zero_positive_and_manual_half_level():
    torch.manual_seed(0)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = PyramidL1Loss()
    assert loss(real, real.clone()).item() == 0.0
    terms = loss.terms(fake, real)
    assert set(terms) == {"l1_full", "l1_half"}
    torch.testing.assert_close(terms["l1_full"], 25.0 * (fake - real).abs().mean())
    torch.testing.assert_close(
        terms["l1_half"], 25.0 * (manual_half_level(fake) - manual_half_level(real)).abs().mean()
    )
    torch.testing.assert_close(loss(fake, real), terms["l1_full"] + terms["l1_half"])
    # the blur removes high frequencies, so the half-level difference of two noise images is smaller than full-res
    assert 0 < terms["l1_half"] < terms["l1_full"]

    one_blur = PyramidL1Loss(levels=(2,), weights=(1.0,), blurs_per_level=1)
    torch.testing.assert_close(
        one_blur(fake, real), (manual_half_level(fake, blurs=1) - manual_half_level(real, blurs=1)).abs().mean()
    )

    fake.requires_grad_(True)
    loss(fake, real).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_pyramid_levels_and_weights_configuration():
    torch.manual_seed(1)
    real, fake = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    default_terms = PyramidL1Loss().terms(fake, real)
    all_terms = PyramidL1Loss(levels=(1, 2, 4, 8), weights=(1.0, 2.0, 3.0, 4.0)).terms(fake, real)
    assert list(all_terms) == ["l1_full", "l1_half", "l1_quarter", "l1_eighth"]
    torch.testing.assert_close(all_terms["l1_half"], default_terms["l1_half"] * 2.0 / 25.0)
    only_quarter = PyramidL1Loss(levels=(4,), weights=(3.0,))
    torch.testing.assert_close(only_quarter(fake, real), all_terms["l1_quarter"])
    # the 1/4 level is the 1/2 operation applied twice
    pyr = GaussianPyramid()
    torch.testing.assert_close(pyr(real, 2)[2], manual_half_level(manual_half_level(real)))
    # blurring keeps a constant image constant (normalised kernel, reflection border)
    assert torch.allclose(pyr(torch.full((1, 3, 16, 16), 0.3), 3)[3], torch.tensor(0.3))
    assert PyramidL1Loss(levels=(1, 2), weights=(25.0, 0.0))(fake, real) == default_terms["l1_full"]

    with pytest.raises(ValueError, match="downscale factors"):
        PyramidL1Loss(levels=(1, 3), weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="one weight per level"):
        PyramidL1Loss(levels=(1, 2, 4), weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        PyramidL1Loss()(fake, real[..., :32])
    with pytest.raises(ValueError, match="too small"):
        PyramidL1Loss(levels=(8,), weights=(1.0,))(fake[..., :8, :8], real[..., :8, :8])


# -------------------------------------------------------------------------------------------------------- GAN loss
def test_gan_loss_vanilla_lsgan_and_halved_discriminator():
    torch.manual_seed(0)
    pred_real, pred_fake = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    vanilla, lsgan = GANLoss(), GANLoss("lsgan")
    torch.testing.assert_close(vanilla(pred_real, True), -F.logsigmoid(pred_real).mean())
    torch.testing.assert_close(vanilla(pred_fake, False), -F.logsigmoid(-pred_fake).mean())
    torch.testing.assert_close(lsgan(pred_real, True), ((pred_real - 1) ** 2).mean())
    torch.testing.assert_close(lsgan(pred_fake, False), (pred_fake**2).mean())
    for loss in (vanilla, lsgan):
        torch.testing.assert_close(
            loss.discriminator_loss(pred_real, pred_fake), 0.5 * (loss(pred_real, True) + loss(pred_fake, False))
        )
        torch.testing.assert_close(loss.generator_loss(pred_fake), loss(pred_fake, True))
    assert not torch.isclose(vanilla(pred_real, True), lsgan(pred_real, True))

    # same values as MONAI's PatchAdversarialLoss for moderate logits ...
    monai_bce = PatchAdversarialLoss(criterion="bce")
    monai_ls = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
    torch.testing.assert_close(vanilla(pred_fake, False), monai_bce(pred_fake, False, True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lsgan(pred_real, True), monai_ls(pred_real, True, True))
    # ... but no saturation for a confident discriminator (MONAI's sigmoid + BCELoss clamps at 100)
    confident = torch.full((1, 1, 2, 2), 200.0)
    assert vanilla(confident, False).item() == pytest.approx(200.0)

    smoothed = GANLoss(target_real=0.9)
    logits = torch.linspace(-1, 4, 501)
    values = torch.stack([smoothed(v.reshape(1), True) for v in logits])
    assert logits[values.argmin()].item() == pytest.approx(math.log(9.0), abs=0.02)
    with pytest.raises(ValueError, match="mode"):
        GANLoss("wgan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GANLoss(target_real=1.5)


# ------------------------------------------------------------------------------------------------------------ CM-GAN
def stains(batch: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1, torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def record_batches(module: nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[0]))
    return seen


def test_synthesize_fills_only_missing_stains():
    gan = tiny_cmgan().eval()
    he, ihc = stains()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    he[2] = 0
    ihc[[1, 3]] = 0
    calls_he, calls_ihc = record_batches(gan.ihc_to_he), record_batches(gan.he_to_ihc)
    he_out, ihc_out = gan.synthesize(he, ihc, mask)
    assert calls_he == [1] and calls_ihc == [2]  # each generator ran once, on the samples that needed it
    for i in (0, 1, 3):
        assert torch.equal(he_out[i], he[i])
    for i in (0, 2):
        assert torch.equal(ihc_out[i], ihc[i])
    with torch.no_grad():
        torch.testing.assert_close(he_out[2:3], gan.ihc_to_he(ihc[2:3]))
        torch.testing.assert_close(ihc_out[[1, 3]], gan.he_to_ihc(he[[1, 3]]))
    assert he_out[2].abs().sum() > 0 and ihc_out[1].abs().sum() > 0
    assert he[2].abs().sum() == 0  # inputs are not modified in place

    # dual batch: nothing runs, inputs come back as they are
    calls_he.clear(), calls_ihc.clear()
    he_same, ihc_same = gan(he, ihc, torch.ones(4, 2))
    assert calls_he == [] and calls_ihc == [] and he_same is he and ihc_same is ihc

    # a stain missing for the whole batch may be passed as None
    he_all, ihc_kept = gan.synthesize(None, ihc, torch.tensor([[0.0, 1.0]] * 4))
    assert he_all.shape == ihc.shape and torch.equal(ihc_kept, ihc)
    with torch.no_grad():
        torch.testing.assert_close(he_all, gan.ihc_to_he(ihc))


def test_synthesize_bad_input():
    gan = tiny_cmgan()
    he, ihc = stains(2)
    with pytest.raises(ValueError, match=r"samples \[1\] have neither"):
        gan.synthesize(he, ihc, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="he is None"):
        gan.synthesize(None, ihc, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="ihc is None"):
        gan.synthesize(he, None, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        gan.synthesize(he, ihc, torch.ones(2, 3))
    with pytest.raises(ValueError, match="only 0 .missing. and 1"):
        gan.synthesize(he, ihc, torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="batch size mismatch"):
        gan.synthesize(he, ihc[:1], torch.ones(2, 2))
    with pytest.raises(ValueError, match="3 RGB channels"):
        gan.synthesize(he[:, :1], ihc, torch.ones(2, 2))


def test_freeze_keeps_eval_and_blocks_gradients():
    gan = tiny_cmgan()
    he, ihc = stains(2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    # unfrozen and training: gradients reach the generator that produced the missing stain
    he_out, ihc_out = gan.synthesize(he, ihc, mask)
    (he_out.sum() + ihc_out.sum()).backward()
    assert all(p.grad is not None for p in gan.parameters())
    gan.zero_grad(set_to_none=True)

    parent = nn.Sequential(gan, nn.Linear(2, 2))
    gan.freeze()
    parent.train()
    assert gan.is_frozen and not gan.training
    assert all(not m.training for m in gan.modules())
    assert parent[1].training
    assert all(not p.requires_grad for p in gan.parameters())
    bn = next(m for m in gan.he_to_ihc.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    he_req = he.clone().requires_grad_(True)
    out1 = gan.synthesize(he_req, ihc, mask)
    out2 = gan.synthesize(he_req, ihc, mask)
    assert not out1[1].requires_grad  # ran under no_grad
    assert torch.equal(out1[1], out2[1])  # dropout off
    assert torch.equal(bn.running_mean, stats)  # BatchNorm statistics untouched

    gan.unfreeze().train()
    assert gan.training and all(p.requires_grad for p in gan.parameters())


def test_discriminators_are_a_separate_module():
    gan, discs = tiny_cmgan(), CrossModalDiscriminators(ndf=4)
    assert not {id(p) for p in gan.parameters()} & {id(p) for p in discs.parameters()}
    assert isinstance(discs.disc_ihc, PatchGANDiscriminator) and discs.disc_ihc.in_channels == 6
    discs.set_trainable(False)
    assert not any(p.requires_grad for p in discs.parameters())
    discs.set_trainable(True)
    assert all(p.requires_grad for p in discs.parameters())
    # The stage-1 output file is the generators' state dict alone, with their architecture record.
    assert all(k.startswith(("he_to_ihc.", "ihc_to_he.")) or k == "_extra_state" for k in gan.state_dict())


def test_cmgan_file_rebuilds_its_own_architecture(tmp_path):
    trained = tiny_cmgan(metadata={"image_size": 32})
    he, ihc = stains(2)
    trained(he, ihc, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # updates BatchNorm running stats (buffers)
    trained.eval()
    path = tmp_path / "cmgan.pt"
    torch.save(trained.state_dict(), path)
    record = torch.load(path, weights_only=True)["_extra_state"]
    assert record["class"] == "CrossModalGAN" and record["arguments"]["ngf"] == 4
    assert record["metadata"] == {"image_size": 32}

    torch.manual_seed(123)
    fresh = frozen_cmgan(path)  # no architecture argument: it comes from the file
    assert fresh.is_frozen and fresh.metadata == {"image_size": 32}
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        for a, b in zip(trained(he, ihc, mask), fresh(he, ihc, mask)):
            assert torch.equal(a, b)

    # Loading into a network built differently names the differing arguments.
    with pytest.raises(ArchitectureMismatchError, match="n_blocks=1 in the file, 2 here"):
        CrossModalGAN(ngf=4, n_blocks=2).load_state_dict(torch.load(path, weights_only=True))
    torch.save({k: v for k, v in trained.state_dict().items() if k != "_extra_state"}, path)
    with pytest.raises(ArchitectureMismatchError, match="another bundle"):
        frozen_cmgan(path)
    with pytest.raises(FileNotFoundError, match="run train_gan"):
        frozen_cmgan(tmp_path / "nope.pt")
