"""The predictor under faults that come from outside its inputs: a network that answers NaN, and several threads.

Rows 106 and 107 of ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_CONFIGS

from her2_monai.inference import load_predictor
from her2_monai.inference.deploy import PRED_KEY


def _pairs(bundle: Path, n: int) -> list[tuple[Path, Path]]:
    he_files = sorted((bundle / "cache").rglob("HE/test/*.png"))[:n]
    pairs = [(he, Path(str(he).replace("/HE/", "/IHC/"))) for he in he_files]
    assert len(pairs) == n and all(ihc.is_file() for _, ihc in pairs)
    return pairs


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_network_output_with_nan_or_inf_is_referred_without_a_score(trained_bundle: Path, bad: float) -> None:
    predictor = load_predictor(trained_bundle, BUNDLE_CONFIGS / "inference.json")
    honest = predictor.network.predict_batch

    def broken(*args, **kwargs):
        out = honest(*args, **kwargs)
        out[PRED_KEY] = out[PRED_KEY].clone()
        out[PRED_KEY][:, 1] = bad  # one class's logit goes bad: the softmax is NaN or one-hot
        return out

    predictor.network.predict_batch = broken
    he, ihc = _pairs(trained_bundle, 1)[0]
    result = predictor.predict(he=he, ihc=ihc)
    if bad == math.inf:  # softmax of +inf is NaN (inf - inf): refused the same way
        assert not torch.isfinite(torch.tensor([bad])).all()
    assert result["score"] is None and result["probabilities"] is None and result["confidence"] is None
    assert result["refer"] and result["refer_reasons"][0] == "invalid_output"
    assert "low_confidence" not in result["refer_reasons"]
    assert any("not finite" in w for w in result["warnings"])
    json.loads(json.dumps(result, allow_nan=False))  # the answer stays valid JSON


def test_one_predictor_serves_several_threads_with_the_answers_of_one(trained_bundle: Path) -> None:
    predictor = load_predictor(trained_bundle, BUNDLE_CONFIGS / "inference.json")
    cases = [{"he": he, "ihc": ihc} for he, ihc in _pairs(trained_bundle, 4)]
    cases += [{"he": he} for he, _ in _pairs(trained_bundle, 2)] + [
        {"image": ihc} for _, ihc in _pairs(trained_bundle, 2)
    ]
    alone = [predictor.predict(**case) for case in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda case: predictor.predict(**case), cases * 3))
    for i, result in enumerate(together):
        expected = alone[i % len(cases)]
        assert result["score"] == expected["score"] and result["scenario"] == expected["scenario"]
        assert result["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
