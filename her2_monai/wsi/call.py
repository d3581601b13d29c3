"""The slide-level (or region-level) HER2 call from per-tile scores, in the ASCO/CAP style.

ASCO/CAP 2018 scores a slide by the share of invasive tumour cells with each membrane staining pattern, and a
pattern counts when it is seen in **more than 10%** of the tumour cells: 3+ if more than 10% show strong complete
staining; otherwise 2+ if more than 10% show at least weak-to-moderate complete staining; otherwise 1+ if more than
10% show at least faint incomplete staining; otherwise 0. Here tiles stand in for cells:

1. tiles flagged ``refer`` (the model is not confident, or the stain could not be told) are **excluded** from the
   shares and **counted** (``referred``);
2. ``share[s]`` = share of the remaining tiles scored ``s``; ``at_least[s]`` = share scored ``s`` or higher;
3. the call is the highest score ``s`` with ``at_least[s] > threshold`` (10%), else ``0``;
4. the slide itself is referred when fewer than ``min_tiles`` tiles remain or more than ``max_referred`` of the tiles
   were referred, and a 2+ call is marked ``equivocal`` (ASCO/CAP: reflex in-situ hybridisation).

Every tissue tile counts as tumour: the bundle has no tumour detector, so a slide with much benign tissue is scored
over all of it. This is a screening aid for a pathologist, not a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from her2_monai.constants import CLASS_NAMES

__all__ = ["RULE", "slide_call"]

#: One-line description of the rule, written into ``slide.json``.
RULE = (
    "ASCO/CAP-style: referred tiles excluded and counted; score = highest s with share(tiles scored >= s) > threshold "
    "among the rest, else 0; 2+ is equivocal"
)


def slide_call(
    scores: Sequence[str],
    refer: Sequence[bool],
    threshold: float = 0.10,
    min_tiles: int = 10,
    max_referred: float = 0.5,
) -> dict[str, Any]:
    """Combine per-tile scores into one call.

    Args:
        scores: each tile's score (one of ``CLASS_NAMES``).
        refer: each tile's ``refer`` flag.
        threshold: share of tiles a score (or higher) must exceed.
        min_tiles: fewer non-referred tiles than this refers the slide.
        max_referred: a larger share of referred tiles refers the slide.

    Returns:
        ``score`` (or ``None`` when no tile could be used), ``tiles`` (all), ``referred``, ``scored`` (used),
        ``counts`` and ``referred_counts`` per class, ``share`` and ``at_least`` per class (over the used tiles),
        ``threshold``, ``equivocal``, ``refer`` and ``refer_reasons``.

    Raises:
        ValueError: for mismatched lengths, an unknown score or a threshold outside ``[0, 1)``.
    """
    if len(scores) != len(refer):
        raise ValueError(f"got {len(scores)} scores and {len(refer)} refer flags")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    unknown = sorted({s for s in scores if s not in CLASS_NAMES})
    if unknown:
        raise ValueError(f"unknown tile scores {unknown}; expected {list(CLASS_NAMES)}")
    counts = {name: 0 for name in CLASS_NAMES}
    referred_counts = {name: 0 for name in CLASS_NAMES}
    for score, flagged in zip(scores, refer):
        (referred_counts if flagged else counts)[score] += 1
    used = sum(counts.values())
    referred = sum(referred_counts.values())
    share = {name: (counts[name] / used if used else 0.0) for name in CLASS_NAMES}
    at_least = {name: sum(share[n] for n in CLASS_NAMES[i:]) for i, name in enumerate(CLASS_NAMES)}
    call = None
    if used:
        call = next((name for name in reversed(CLASS_NAMES[1:]) if at_least[name] > threshold), CLASS_NAMES[0])
    reasons = []
    if used < min_tiles:
        reasons.append(f"only {used} confidently scored tissue tiles (fewer than {min_tiles})")
    if scores and referred / len(scores) > max_referred:
        reasons.append(f"{referred} of {len(scores)} tiles referred (more than {max_referred:.0%})")
    return {
        "score": call,
        "tiles": len(scores),
        "referred": referred,
        "scored": used,
        "counts": counts,
        "referred_counts": referred_counts,
        "share": {k: round(v, 6) for k, v in share.items()},
        "at_least": {k: round(v, 6) for k, v in at_least.items()},
        "threshold": float(threshold),
        "equivocal": call == "2+",
        "refer": bool(reasons),
        "refer_reasons": reasons,
        "rule": RULE,
    }
