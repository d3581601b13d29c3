"""Ignite/MONAI event handlers: atomic checkpoints, resumption, image grids, logging helpers."""

from __future__ import annotations

from her2_monai.handlers.checkpoint import (
    AtomicCheckpointSaver,
    BestModelSaver,
    GeneratorExporter,
    ResumeFromCheckpoint,
    atomic_torch_save,
    remove_stale_temporaries,
)
from her2_monai.handlers.distributed import BroadcastBuffers
from her2_monai.handlers.image_grid import TranslationGridSaver
from her2_monai.handlers.logging import scalar_output
from her2_monai.handlers.progress import ProgressBarHandler

__all__ = [
    "AtomicCheckpointSaver",
    "BestModelSaver",
    "GeneratorExporter",
    "ResumeFromCheckpoint",
    "atomic_torch_save",
    "remove_stale_temporaries",
    "BroadcastBuffers",
    "TranslationGridSaver",
    "scalar_output",
    "ProgressBarHandler",
]
