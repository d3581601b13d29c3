"""Ignite/MONAI event handlers: atomic checkpoints, resumption, image grids, logging helpers."""

from __future__ import annotations

from her2_monai.handlers.checkpoint import (
    AtomicCheckpointSaver,
    BestModelSaver,
    GeneratorExporter,
    ResumeFromCheckpoint,
    atomic_torch_save,
)
from her2_monai.handlers.image_grid import TranslationGridSaver
from her2_monai.handlers.logging import scalar_output
from her2_monai.handlers.progress import ProgressBarHandler

__all__ = [
    "AtomicCheckpointSaver",
    "BestModelSaver",
    "GeneratorExporter",
    "ResumeFromCheckpoint",
    "atomic_torch_save",
    "TranslationGridSaver",
    "scalar_output",
    "ProgressBarHandler",
]
