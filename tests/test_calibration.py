"""Calibration, referral, MC-dropout and out-of-distribution arithmetic against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from her2_monai.calibration import (
    REFER_ALL,
    MahalanobisScore,
    TrustScorer,
    apply_temperature,
    calibration_summary,
    choose_refer_threshold,
    classwise_ece,
    collect_scenario_outputs,
    coverage_accuracy_curve,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    mc_dropout_head,
    negative_log_likelihood,
    ood_threshold,
    referral_outcome,
)
from her2_monai.calibration.ood import EnergyScore, MaxSoftmaxScore
from her2_monai.engines.evaluators import ScenarioEvaluator
from her2_monai.metrics.classification import roc_auc
from her2_monai.networks.her2net import DualPoolHead

#: Four predictions of a two-class model (confidences away from the 15-bin edges, k / 15).
PROBS = np.array([[0.95, 0.05], [0.90, 0.10], [0.35, 0.65], [0.62, 0.38]])
LABELS = np.array([0, 1, 1, 1])


def test_ece_matches_the_hand_computed_value() -> None:
    # Top-label confidences 0.95 (right, bin 14), 0.90 (wrong, bin 13), 0.65 (right) and 0.62 (wrong) share bin 9:
    # ECE = 1/4 |1 - 0.95| + 1/4 |0 - 0.90| + 2/4 |0.5 - 0.635| = 0.0125 + 0.225 + 0.0675.
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(0.305, abs=1e-6)
    # A perfectly calibrated set: confidence 0.75 (bin 11), three of four right.
    calibrated = np.tile([0.75, 0.25], (4, 1))
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-6)


def test_classwise_ece_matches_the_hand_computed_value() -> None:
    # Class 0: p0 = 0.95 (y=1), 0.90, 0.35, 0.62 (y=0), each alone in its bin: (0.05 + 0.90 + 0.35 + 0.62) / 4.
    # Class 1: p1 = 0.05 (y=0), 0.10, 0.65, 0.38 (y=1): (0.05 + 0.90 + 0.35 + 0.62) / 4.
    assert classwise_ece(PROBS, LABELS) == pytest.approx([0.48, 0.48], abs=1e-6)
    # Three classes, two samples of class 2 in one bin of p2 (0.70 and 0.72, one of them class 2).
    probs = np.array([[0.2, 0.1, 0.7], [0.18, 0.1, 0.72], [0.1, 0.8, 0.1]])
    per_class = classwise_ece(probs, np.array([2, 0, 1]))
    # p2: bin 10 holds 0.70 and 0.72 (mean 0.71, frequency 0.5) and 0.1 (y=0) alone: (2 * 0.21 + 0.1) / 3.
    assert per_class[2] == pytest.approx((2 * 0.21 + 0.1) / 3, abs=1e-6)
    summary = calibration_summary(probs, np.array([2, 0, 1]), class_names=("0", "1+", "2+"))
    assert summary["ece_per_class"]["2+"] == pytest.approx(per_class[2]) and sum(summary["bins"]["count"]) == 3


def test_temperature_scaling_lowers_the_nll_of_an_over_confident_model() -> None:
    rng = np.random.default_rng(0)
    n, classes, scale, accuracy = 400, 4, 10.0, 0.7
    labels = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < accuracy, labels, (labels + rng.integers(1, classes, n)) % classes)
    logits = scale * np.eye(classes)[predicted]  # every prediction at confidence ~1: over-confident
    hit_rate = float((predicted == labels).mean())
    temperature = fit_temperature(logits, labels)
    before = negative_log_likelihood(apply_temperature(logits, 1.0), labels)
    after = negative_log_likelihood(apply_temperature(logits, temperature), labels)
    assert temperature > 1.0 and after < 0.5 * before
    # Optimum by hand: softmax confidence e^(s/T) / (e^(s/T) + C - 1) equals the hit rate.
    expected = scale / np.log(hit_rate * (classes - 1) / (1 - hit_rate))
    assert temperature == pytest.approx(expected, rel=1e-3)
    assert (apply_temperature(logits, temperature).argmax(1) == predicted).all()  # the decision is unchanged
    assert expected_calibration_error(apply_temperature(logits, temperature), labels) < 0.01


def test_referral_threshold_meets_its_target_on_a_fixed_array() -> None:
    confidence = np.array([0.99, 0.95, 0.90, 0.80, 0.70, 0.60])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    curve = coverage_accuracy_curve(confidence, correct)
    assert curve["coverage"] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert curve["accuracy"] == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.8, 4 / 6])
    choice = choose_refer_threshold(confidence, correct, 0.8)
    assert choice["threshold"] == 0.70 and choice["coverage"] == pytest.approx(5 / 6) and choice["target_met"]
    choice = choose_refer_threshold(confidence, correct, 0.95)
    assert choice["threshold"] == 0.90 and choice["accuracy"] == 1.0 and choice["coverage"] == 0.5
    kept = confidence >= choice["threshold"]
    assert correct[kept].mean() >= 0.95  # the target holds on the array it was chosen on
    outcome = referral_outcome(confidence, correct, choice["threshold"])
    assert outcome["referral_rate"] == 0.5 and outcome["accuracy_kept"] == 1.0 and outcome["accuracy_referred"] == 1 / 3
    impossible = choose_refer_threshold(confidence, np.zeros(6, dtype=bool), 0.95)
    assert impossible["threshold"] == REFER_ALL > 1.0 and not impossible["target_met"] and impossible["coverage"] == 0
    ties = coverage_accuracy_curve([0.9, 0.9, 0.5], [True, False, True])
    assert ties["threshold"] == [0.9, 0.5] and ties["coverage"] == pytest.approx([2 / 3, 1.0])
    with pytest.raises(ValueError, match="target_accuracy"):
        choose_refer_threshold(confidence, correct, 1.5)


def test_mahalanobis_separates_two_gaussian_clouds_and_its_threshold_passes_95_percent() -> None:
    rng = np.random.default_rng(0)
    dim = 32
    labels = np.repeat([0, 1], 200)
    centres = np.zeros((2, dim))
    centres[0, 0], centres[1, 0] = -2.0, 2.0
    train = centres[labels] + rng.normal(size=(400, dim))
    val = centres[np.repeat([0, 1], 100)] + rng.normal(size=(200, dim))
    far = rng.normal(size=(200, dim)) + 4.0  # another cloud, off every class centre
    scorer = MahalanobisScore(components=16).fit(np.zeros((400, 2)), train, labels)
    inside, outside = scorer.score(None, val), scorer.score(None, far)
    auroc = roc_auc_score(np.r_[np.zeros(200), np.ones(200)], np.r_[inside, outside])
    assert auroc > 0.99
    threshold = ood_threshold(inside, 0.95)
    assert np.mean(inside <= threshold) >= 0.95 and np.mean(outside > threshold) > 0.9
    # The stored state rebuilds the same score.
    again = MahalanobisScore.from_state(scorer.state())
    assert again.score(None, far) == pytest.approx(outside, rel=1e-4)
    # Hand check of the logit-only scores.
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert EnergyScore().score(logits) == pytest.approx(-np.log([np.e**2 + 1, 2.0]))
    assert MaxSoftmaxScore().score(logits) == pytest.approx([-(np.e**2) / (np.e**2 + 1), -0.5])
    assert ood_threshold([1.0, 2.0, 3.0, 4.0], 0.75) == 3.0 and ood_threshold([], 0.95) == float("inf")


def test_mc_dropout_gives_entropy_and_mutual_information() -> None:
    head = DualPoolHead(8, num_classes=4, dropout=0.0)
    embedding = torch.randn(5, 16)
    out = mc_dropout_head(head, embedding, passes=10)
    expected = torch.softmax(head.fc(embedding), dim=1)
    assert torch.allclose(out["probabilities"], expected, atol=1e-6)  # no dropout: every pass is the same
    assert torch.allclose(out["mutual_information"], torch.zeros(5), atol=1e-6)
    assert torch.allclose(out["entropy"], -(expected * expected.log()).sum(1), atol=1e-5)
    head = DualPoolHead(8, num_classes=4, dropout=0.5)
    out = mc_dropout_head(head, embedding, passes=50, generator=torch.Generator().manual_seed(0))
    assert (out["mutual_information"] > 0).all() and (out["mutual_information"] <= out["entropy"] + 1e-6).all()
    with pytest.raises(ValueError, match="passes"):
        mc_dropout_head(head, embedding, passes=0)


def test_fit_calibration_builds_a_record_the_scorer_applies() -> None:
    rng = np.random.default_rng(1)

    def part(n: int, shift: float = 0.0) -> dict:
        labels = rng.integers(0, 4, n)
        logits = 6.0 * np.eye(4)[labels] + rng.normal(scale=3.0, size=(n, 4))
        return {"logits": logits, "label": labels, "embedding": np.eye(4)[labels] * 3 + rng.normal(size=(n, 4)) + shift}

    validation = {"dual": part(200), "he_only": part(200)}
    training = {"dual": part(400), "he_only": part(400)}
    record = fit_calibration(validation, training, target_accuracy=0.95, ood_options={"components": 4})
    assert record["temperature"] > 1.0 and record["validation"]["nll_after"] < record["validation"]["nll_before"]
    for scenario, part_ in validation.items():
        probs = apply_temperature(part_["logits"], record["temperature"])
        kept = probs.max(1) >= record["refer_threshold"][scenario]
        assert (probs.argmax(1) == part_["label"])[kept].mean() >= 0.95
        assert record["ood"]["validation_pass_rate"][scenario] >= 0.95
    scorer = TrustScorer(record)
    assert scorer.calibrated and scorer.has_ood and scorer.temperature == record["temperature"]
    assert scorer.refer_threshold(0) == record["refer_threshold"]["dual"]
    far = part(50, shift=20.0)
    assert (scorer.ood_scores(far["logits"], far["embedding"]) > scorer.ood_threshold("dual")).all()
    plain = TrustScorer(None)
    assert plain.temperature == 1.0 and plain.refer_threshold("dual") == 0.5 and np.isnan(plain.ood_threshold(0))


def test_roc_auc_counts_ordered_pairs_and_is_nan_for_one_group() -> None:
    positive = np.array([True, False, True, False, True])
    scores = np.array([0.9, 0.1, 0.4, 0.4, 0.2])
    # 3 positives x 2 negatives: (0.9 beats both), (0.4 beats 0.1, ties 0.4: 1.5), (0.2 beats 0.1) -> 4.5 / 6
    assert roc_auc(positive, scores) == pytest.approx(4.5 / 6)
    assert np.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))
    assert np.isnan(roc_auc(np.zeros(3, bool), np.arange(3.0)))


class _MeanNet(torch.nn.Module):
    """Logits from the stains' mean colours and the availability mask; the embedding is the mean colours."""

    def forward(self, he: torch.Tensor, ihc: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        colours = torch.cat([he.mean(dim=(2, 3)), ihc.mean(dim=(2, 3))], dim=1)
        return {"logits": colours[:, :4] + mask.sum(dim=1, keepdim=True), "embedding": colours}


def test_calibration_and_evaluation_run_the_same_scenarios_on_the_labelled_samples() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = {
        "he": torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1,
        "ihc": torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1,
        "mask": torch.ones(4, 2),
        "label": torch.tensor([0, 1, -1, 3]),
    }
    scenarios = ("dual", "he_only")
    collected = collect_scenario_outputs(_MeanNet(), [batch], scenarios=scenarios)
    evaluator = ScenarioEvaluator("cpu", [batch], _MeanNet(), scenarios=scenarios, output_keys=("embedding",))
    evaluator.run()
    evaluated = evaluator.state.output
    labelled = [0, 1, 3]
    for scenario in scenarios:
        np.testing.assert_array_equal(collected[scenario]["label"], [0, 1, 3])
        np.testing.assert_allclose(collected[scenario]["logits"], evaluated["logits"][scenario].numpy(), rtol=1e-6)
        np.testing.assert_allclose(collected[scenario]["embedding"], evaluated["embedding"][scenario].numpy())
    # dual sees both stains; H&E-only sees the IHC zeroed and flagged missing
    np.testing.assert_allclose(
        collected["dual"]["logits"], _MeanNet()(batch["he"], batch["ihc"], batch["mask"])["logits"][labelled], rtol=1e-6
    )
    he_only = _MeanNet()(batch["he"], torch.zeros_like(batch["ihc"]), torch.tensor([[1.0, 0.0]] * 4))["logits"]
    np.testing.assert_allclose(collected["he_only"]["logits"], he_only[labelled], rtol=1e-6, atol=1e-7)
