"""Out-of-distribution scores and their inputs: each score's fit, score and stored state; the threshold rule; the
image, stage and cycle statistics taken from one classifier call; the calibration record and its scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from her2_monai.calibration import TrustScorer, fit_calibration
from her2_monai.calibration.ood import (
    OOD_METHODS,
    CycleErrorScore,
    GaussianStatistics,
    ImageStatisticsScore,
    KNNScore,
    MahalanobisScore,
    StageStatisticsScore,
    UnionScore,
    build_ood,
    ood_from_state,
    ood_rank_capped,
    ood_threshold,
)
from her2_monai.calibration.ood_features import (
    ImageStatistics,
    capture_stage_statistics,
    classify_with_ood_inputs,
    cycle_error,
)

RNG_SEED = 0


def _round_trip(score):
    """Through JSON text: the state is plain data."""
    return ood_from_state(json.loads(json.dumps(score.state())))


def _per_stain(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0, he_only: int = 0) -> dict:
    """Per-stain inputs of ``n`` cases (the last ``he_only`` without IHC) for every per-stain family."""
    base = {slot: rng.normal(size=(n, dim)) + shift + (3.0 if slot == "ihc" else 0.0) for slot in ("he", "ihc")}
    if he_only:
        base["ihc"][-he_only:] = np.nan
    return {f"{family}_{slot}": base[slot] for family in ("image", "stages", "cycle") for slot in ("he", "ihc")}


@pytest.mark.parametrize("cls", [ImageStatisticsScore, StageStatisticsScore, CycleErrorScore])
def test_per_stain_scores_pass_their_distribution_refuse_a_shift_and_round_trip(cls) -> None:
    rng = np.random.default_rng(RNG_SEED)
    dim = 1 if cls is CycleErrorScore else 12
    train, val = _per_stain(rng, 300, dim), _per_stain(rng, 200, dim)
    score = cls().fit_inputs(train)
    assert set(score.requires) == {f"{cls.family}_he", f"{cls.family}_ihc"}
    threshold = ood_threshold(score.score_inputs(val), 0.95)
    fresh, shifted = _per_stain(rng, 200, dim), _per_stain(rng, 50, dim, shift=6.0)
    assert np.mean(score.score_inputs(fresh) <= threshold) >= 0.9
    assert (score.score_inputs(shifted) > threshold).all()
    again = _round_trip(score)
    assert type(again) is cls
    np.testing.assert_allclose(again.score_inputs(fresh), score.score_inputs(fresh), rtol=1e-4)
    # A case scores its own stains only: an H&E-only case whose IHC slot would be far is not refused for it.
    one_stain = _per_stain(rng, 20, dim, he_only=20)
    for family in ("image", "stages", "cycle"):
        one_stain[f"{family}_ihc"][:] = np.nan
    assert np.isfinite(score.score_inputs(one_stain)).all()
    with pytest.raises(ValueError, match="fit_inputs"):
        cls().fit(None, None, None)
    if dim > 1:  # statistics of another version (one feature fewer) are refused, naming the fix
        with pytest.raises(ValueError, match="refit"):
            score.score_inputs({k: v[:, :-1] for k, v in fresh.items()})


def test_a_shift_in_one_stain_is_enough_to_refuse_a_dual_case() -> None:
    rng = np.random.default_rng(1)
    score = ImageStatisticsScore().fit_inputs(_per_stain(rng, 300, 8))
    case = _per_stain(rng, 30, 8)
    threshold = ood_threshold(score.score_inputs(_per_stain(rng, 200, 8)), 0.95, margin=1.0)
    case["image_ihc"] += 8.0  # the IHC is unlike every training IHC; the H&E is typical
    assert (score.score_inputs(case) > threshold).all()


def test_gaussian_statistics_floor_keeps_a_constant_feature_from_exploding() -> None:
    rng = np.random.default_rng(2)
    train = np.c_[rng.normal(size=(100, 3)), np.zeros(100)]  # the last feature never varies in training
    model = GaussianStatistics(min_scale=0.01).fit(train)
    nudged = np.c_[rng.normal(size=(5, 3)), np.full(5, 1e-4)]  # rounding-sized change of the constant feature
    assert (model.distance(nudged) < 10).all()
    assert (model.distance(np.c_[np.zeros((1, 3)), [[1.0]]]) > 50).all()  # a real change of it is far
    assert GaussianStatistics.from_state(json.loads(json.dumps(model.state()))).distance(nudged) == pytest.approx(
        model.distance(nudged), rel=1e-4
    )
    with pytest.raises(ValueError, match="finite"):
        GaussianStatistics().fit(np.full((3, 2), np.nan))


def test_knn_score_passes_its_cloud_refuses_another_and_round_trips() -> None:
    rng = np.random.default_rng(3)
    centre = np.r_[5.0, np.zeros(31)]
    train, val, fresh = (centre + rng.normal(size=(n, 32)) for n in (400, 200, 200))
    far = np.r_[0.0, 5.0, np.zeros(30)] + rng.normal(size=(50, 32))  # another direction: far after normalising
    score = KNNScore(k=5, components=16, bank_size=300).fit(None, train)
    threshold = ood_threshold(score.score(None, val), 0.95)
    assert np.mean(score.score(None, fresh) <= threshold) >= 0.9 and (score.score(None, far) > threshold).all()
    assert score.state()["components"] == 16 and len(score.state()["bank"]) == 300
    np.testing.assert_allclose(_round_trip(score).score(None, far), score.score(None, far), rtol=1e-3)
    with pytest.raises(ValueError, match="k must be"):
        KNNScore(k=0)


def test_union_refuses_when_any_member_is_far_and_round_trips() -> None:
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 150)
    embedding = np.eye(2)[labels] @ rng.normal(size=(2, 16)) * 3 + rng.normal(size=(300, 16))

    def inputs(n, image_shift=0.0, embedding_shift=0.0):
        rows = rng.choice(300, n)
        return {
            **_per_stain(rng, n, 8, shift=image_shift),
            "embedding": embedding[rows] + rng.normal(size=(n, 16)) * 0.1 + embedding_shift,
            "logits": np.zeros((n, 2)),
        }

    score = UnionScore(["image_stats", "mahalanobis"], {"mahalanobis": {"components": 8}})
    train = {**_per_stain(rng, 300, 8), "embedding": embedding, "logits": np.zeros((300, 2))}
    score.fit_inputs(train, labels)
    assert set(score.requires) == {"image_he", "image_ihc", "embedding"}
    threshold = ood_threshold(score.score_inputs(inputs(200)), 0.95, margin=1.0)
    assert np.mean(score.score_inputs(inputs(200)) <= threshold) >= 0.9
    assert (score.score_inputs(inputs(30, image_shift=8.0)) > threshold).all()  # only the images are unusual
    assert (score.score_inputs(inputs(30, embedding_shift=30.0)) > threshold).all()  # only the features are
    again = _round_trip(score)
    probe = inputs(20, image_shift=8.0)
    np.testing.assert_allclose(again.score_inputs(probe), score.score_inputs(probe), rtol=1e-3)
    with pytest.raises(ValueError, match="union"):
        UnionScore(["union"])


def test_every_registered_method_builds_and_the_old_embedding_score_keeps_its_interface() -> None:
    assert {"msp", "energy", "mahalanobis", "knn", "image_stats", "stage_stats", "cycle", "union"} <= set(OOD_METHODS)
    for name in OOD_METHODS:
        assert build_ood(name).name == name
    with pytest.raises(ValueError, match="unknown OOD method"):
        build_ood("nope")
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], 50)
    score = MahalanobisScore(components=4).fit_inputs({"embedding": rng.normal(size=(100, 8))}, labels)
    assert score.requires == ("embedding",) and score.score_inputs({"embedding": np.zeros((2, 8))}).shape == (2,)


def test_threshold_rank_margin_and_nan() -> None:
    scores = np.arange(1.0, 21.0)  # 20 validation scores, median 10.5
    assert ood_threshold(scores, 0.95) == 19.0  # the 19th: 95% pass
    assert ood_threshold(scores, 0.95, finite_sample=True) == 20.0  # ceil(21 * 0.95) = 20th
    assert ood_threshold(scores, 0.95, margin=1.0) == 19.0 + (19.0 - 10.5)
    assert ood_threshold(np.r_[scores, np.nan], 0.95) == 19.0  # no evidence is not a score
    assert ood_threshold([1.0, 2.0], 0.95, finite_sample=True) == 2.0  # capped at the largest score
    assert ood_rank_capped(2, 0.95) and not ood_rank_capped(48, 0.95) and ood_rank_capped(18, 0.95)
    assert not ood_rank_capped(19, 0.95)
    with pytest.raises(ValueError, match="margin"):
        ood_threshold(scores, 0.95, margin=-1.0)


def test_image_statistics_are_float32_finite_and_see_texture_and_colour() -> None:
    torch.manual_seed(0)
    stats = ImageStatistics()
    flat = torch.ones(1, 3, 32, 32)  # glass (the white point) on the left, tissue on the right
    flat[..., 16:] = torch.tensor([0.2, 0.0, 0.4]).view(1, 3, 1, 1)  # purple: hematoxylin-like
    noisy = flat.clone()
    noisy[..., 16:] = (noisy[..., 16:] + 0.3 * torch.randn(1, 3, 32, 16)).clamp(-1, 1)
    pink = flat.clone()
    pink[..., 16:] = torch.tensor([0.6, -0.2, 0.4]).view(1, 3, 1, 1)  # eosin-like
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stats(torch.cat([flat, noisy, pink]))
    assert out.shape == (3, stats.num_features) and out.dtype == torch.float32 and torch.isfinite(out).all()
    texture = slice(stats.stain.num_features, None)
    rise = out[1, texture] - out[0, texture]
    assert (rise > 0.1).all() and (rise[:3] > 1.0).all()  # every texture energy (logs) rises, the finest most
    assert (out[2, :12] - out[0, :12]).abs().max() > 0.1  # the stain statistics move with the colour
    with pytest.raises(ValueError, match="at least 12 px"):
        stats(torch.zeros(1, 3, 8, 8))


def _tiny_net():
    from her2_monai.networks import CrossModalGAN, HER2FlexibleNet

    torch.manual_seed(0)
    return HER2FlexibleNet(
        shared_backbone="resnet18",
        specific_backbone="resnet10",
        cmgan=CrossModalGAN(ngf=4, n_blocks=1),
        fusion_channels=16,
        attention_channels=8,
    ).eval()


def test_one_classifier_call_gives_every_input_with_nan_for_missing_stains() -> None:
    net = _tiny_net()
    he, ihc = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    ihc[1], he[2] = 0.0, 0.0
    names = ["logits", "embedding", "image_he", "image_ihc", "stages_he", "stages_ihc", "cycle_he", "cycle_ihc"]
    with torch.no_grad():
        outputs, inputs = classify_with_ood_inputs(net, he, ihc, mask, names)
    assert set(inputs) == set(names) and inputs["logits"].shape == (3, 4)
    widths = {"image": ImageStatistics().num_features, "stages": 2 * sum(net.encoder.shared.stage_channels)}
    widths["cycle"] = 1
    for family, width in widths.items():
        he_rows, ihc_rows = inputs[f"{family}_he"], inputs[f"{family}_ihc"]
        assert he_rows.shape == ihc_rows.shape == (3, width), family
        assert np.isfinite(he_rows[:2]).all() and np.isnan(he_rows[2]).all()  # case 2 has no H&E
        assert np.isfinite(ihc_rows[[0, 2]]).all() and np.isnan(ihc_rows[1]).all()  # case 1 has no IHC
    # The statistics are those of the images and the stages, and the call's outputs are the plain call's.
    np.testing.assert_allclose(inputs["image_he"][0], ImageStatistics()(he[:1])[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(inputs["cycle_ihc"][0], cycle_error(net.cmgan, ihc[:1], True)[0].numpy(), rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(outputs["logits"], net(he, ihc, mask)["logits"], atol=1e-5)
    assert not any(stage._forward_hooks for stage in net.encoder.shared.stages)  # the hooks are gone
    with pytest.raises(ValueError, match="unknown OOD input"):
        classify_with_ood_inputs(net, he, ihc, mask, ["image_xyz"])
    with pytest.raises(ValueError, match="no shared encoder"), capture_stage_statistics(torch.nn.Linear(2, 2)):
        pass


def test_fit_calibration_stores_an_image_statistics_record_that_refuses_shifted_images() -> None:
    rng = np.random.default_rng(6)

    def part(n: int, shift: float = 0.0) -> dict:
        labels = rng.integers(0, 4, n)
        logits = 6.0 * np.eye(4)[labels] + rng.normal(scale=2.0, size=(n, 4))
        return {"logits": logits, "label": labels, "embedding": rng.normal(size=(n, 8)), **_per_stain(rng, n, 6, shift)}

    validation = {"dual": part(60), "he_only": part(60)}
    training = {"dual": part(200), "he_only": part(200)}
    record = fit_calibration(validation, training, ood_method="image_stats", ood_margin=1.0, ood_finite_sample=True)
    ood = record["ood"]
    assert ood["method"] == "image_stats" and ood["margin"] == 1.0 and ood["finite_sample"] is True
    assert set(ood["state"]["stains"]) == {"he", "ihc"}
    assert all(rate >= 0.95 for rate in ood["validation_pass_rate"].values())
    json.dumps(record)  # plain data
    scorer = TrustScorer(json.loads(json.dumps(record)))
    assert scorer.ood_inputs == ("image_he", "image_ihc")
    near, far = part(100), part(20, shift=6.0)
    assert np.mean(scorer.ood_scores(near["logits"], None, near) <= scorer.ood_threshold("dual")) >= 0.9
    assert (scorer.ood_scores(far["logits"], None, far) > scorer.ood_threshold("dual")).all()
    with pytest.raises(KeyError, match="image_he"):
        scorer.ood_scores(far["logits"], far["embedding"])
