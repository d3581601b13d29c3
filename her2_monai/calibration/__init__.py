"""Trustworthy answers: calibration, referral, MC-dropout uncertainty and out-of-distribution refusal.

* :mod:`~her2_monai.calibration.metrics`: ECE (15 bins, top label and class-wise), NLL, reliability bins;
* :mod:`~her2_monai.calibration.temperature`: temperature scaling;
* :mod:`~her2_monai.calibration.referral`: coverage-accuracy curve and the referral threshold with a target;
* :mod:`~her2_monai.calibration.ood`: out-of-distribution scores (image statistics -- the default --, embedding
  Mahalanobis and k-NN, encoder-stage statistics, CM-GAN cycle error, unions, energy, max-softmax) and thresholds;
* :mod:`~her2_monai.calibration.ood_features`: the per-image inputs of those scores, taken from one classifier call;
* :mod:`~her2_monai.calibration.uncertainty`: MC-dropout predictive entropy and mutual information;
* :mod:`~her2_monai.calibration.record`: the calibration record stored in ``models/model.pt``;
* :mod:`~her2_monai.calibration.fit`: fitting it (end of training, ``run calibrating``);
* :mod:`~her2_monai.calibration.scorer`: applying it at inference;
* :mod:`~her2_monai.calibration.analysis`: the evaluation report's trust sections.
"""

from __future__ import annotations

from her2_monai.calibration.fit import CalibrationFitter, collect_scenario_outputs, fit_calibration
from her2_monai.calibration.metrics import (
    NUM_BINS,
    calibration_summary,
    classwise_ece,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from her2_monai.calibration.ood import (
    OOD_METHODS,
    EnergyScore,
    ImageStatisticsScore,
    MahalanobisScore,
    MaxSoftmaxScore,
    build_ood,
    ood_threshold,
)
from her2_monai.calibration.record import CALIBRATION_KEY, read_calibration, write_calibration
from her2_monai.calibration.referral import (
    REFER_ALL,
    choose_refer_threshold,
    coverage_accuracy_curve,
    referral_outcome,
)
from her2_monai.calibration.scorer import DEFAULT_REFER_THRESHOLD, TrustScorer
from her2_monai.calibration.temperature import apply_temperature, fit_temperature, scaled_nll
from her2_monai.calibration.uncertainty import dropout_head, entropy, mc_dropout_head

__all__ = [
    "CalibrationFitter",
    "collect_scenario_outputs",
    "fit_calibration",
    "NUM_BINS",
    "calibration_summary",
    "classwise_ece",
    "expected_calibration_error",
    "negative_log_likelihood",
    "reliability_bins",
    "OOD_METHODS",
    "EnergyScore",
    "ImageStatisticsScore",
    "MahalanobisScore",
    "MaxSoftmaxScore",
    "build_ood",
    "ood_threshold",
    "CALIBRATION_KEY",
    "read_calibration",
    "write_calibration",
    "REFER_ALL",
    "choose_refer_threshold",
    "coverage_accuracy_curve",
    "referral_outcome",
    "DEFAULT_REFER_THRESHOLD",
    "TrustScorer",
    "apply_temperature",
    "fit_temperature",
    "scaled_nll",
    "entropy",
    "dropout_head",
    "mc_dropout_head",
]
