"""Helpers that turn engine outputs into loggable scalars."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["scalar_output"]


def scalar_output(output: Any) -> dict[str, float]:
    """The finite float entries of a trainer's output dict (losses), for ``StatsHandler``/``MLFlowHandler``.

    Args:
        output: ``engine.state.output``.

    Returns:
        ``{name: value}`` for every int/float entry that is finite; ``{}`` for anything else.
    """
    if not isinstance(output, Mapping):
        return {}
    return {
        k: float(v)
        for k, v in output.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
