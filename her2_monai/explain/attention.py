"""Does the classifier weigh real IHC above synthetic IHC? The CBAM stain attention over the test split.

The modality-sensitive attention gives every case a mean channel weight per stain (``stain_attention``: H&E, IHC).
In the ``dual`` scenario both stains are real; in ``he_only`` the IHC is synthesised by the CM-GAN from the H&E; in
``ihc_only`` the H&E is synthetic. The same test cases appear in every scenario, so real and synthetic weights are
compared pairwise (Wilcoxon signed-rank test, SciPy); with unequal sets, unpaired (Mann-Whitney U).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu, wilcoxon

from her2_monai.constants import STAINS

__all__ = ["attention_summary", "real_vs_synthetic"]


def real_vs_synthetic(real: Any, synthetic: Any) -> dict[str, Any]:
    """Mean weights of a stain when real and when synthetic, their difference and a test of it.

    Args:
        real: ``(N,)`` weights of the stain in real images.
        synthetic: ``(M,)`` weights of the same stain synthesised.

    Returns:
        ``{"real_mean", "synthetic_mean", "difference", "real_higher_share", "test", "p_value", "n_real",
        "n_synthetic"}`` (NaN where undefined).
    """
    real = np.asarray(real, dtype=np.float64).reshape(-1)
    synthetic = np.asarray(synthetic, dtype=np.float64).reshape(-1)
    out: dict[str, Any] = {
        "real_mean": float(real.mean()) if real.size else float("nan"),
        "synthetic_mean": float(synthetic.mean()) if synthetic.size else float("nan"),
        "n_real": int(real.size),
        "n_synthetic": int(synthetic.size),
        "test": None,
        "p_value": float("nan"),
        "real_higher_share": float("nan"),
    }
    out["difference"] = out["real_mean"] - out["synthetic_mean"]
    if real.size and real.size == synthetic.size:
        out["real_higher_share"] = float(np.mean(real > synthetic))
        if real.size >= 2 and np.any(real != synthetic):
            out["test"], out["p_value"] = "wilcoxon signed-rank (paired)", float(wilcoxon(real, synthetic).pvalue)
    elif real.size >= 2 and synthetic.size >= 2:
        out["test"], out["p_value"] = "mann-whitney U", float(mannwhitneyu(real, synthetic).pvalue)
    return out


def attention_summary(stain_attention: Mapping[str, Any]) -> dict[str, Any]:
    """Mean stain attention per scenario and the real-versus-synthetic comparison of each stain.

    Args:
        stain_attention: ``{scenario: (N, 2)}`` weights (H&E, IHC) of the test cases.

    Returns:
        ``{"per_scenario": {scenario: {"he", "ihc"}}, "ihc_real_vs_synthetic": ..., "he_real_vs_synthetic": ...}``.
    """
    weights = {s: np.asarray(v, dtype=np.float64).reshape(-1, len(STAINS)) for s, v in stain_attention.items()}
    per_scenario = {
        s: {stain: float(w[:, i].mean()) if len(w) else float("nan") for i, stain in enumerate(STAINS)}
        for s, w in weights.items()
    }
    empty = np.zeros((0, len(STAINS)))
    dual, he_only, ihc_only = (weights.get(s, empty) for s in ("dual", "he_only", "ihc_only"))
    return {
        "per_scenario": per_scenario,
        "ihc_real_vs_synthetic": real_vs_synthetic(dual[:, 1], he_only[:, 1]),
        "he_real_vs_synthetic": real_vs_synthetic(dual[:, 0], ihc_only[:, 0]),
    }
