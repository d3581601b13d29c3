"""A progress bar for long loops, configurable from a bundle config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar

__all__ = ["ProgressBarHandler"]


class ProgressBarHandler:
    """ignite's tqdm ``ProgressBar`` with its ``attach`` arguments given up front (MONAI handlers attach with none).

    Args:
        output_transform: turns ``engine.state.output`` into the values shown next to the bar.
        persist: keep finished bars on screen.
        desc: text before the bar.
    """

    def __init__(
        self, output_transform: Callable[[Any], Any] | None = None, persist: bool = False, desc: str = ""
    ) -> None:
        self.output_transform = output_transform
        self.bar = ProgressBar(persist=persist, desc=desc)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)
