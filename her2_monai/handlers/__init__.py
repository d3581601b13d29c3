"""Ignite/MONAI event handlers: atomic checkpoints and resumption, image grids, probability collection, logging."""

from __future__ import annotations

from her2_monai.handlers.checkpoint import (
    AtomicFileSaver,
    CheckpointHandler,
    ResumeCheckpointLoader,
    VerifiedCheckpointLoader,
)
from her2_monai.handlers.distributed import BroadcastBuffers
from her2_monai.handlers.image_grid import TranslationGridSaver
from her2_monai.handlers.logging import scalar_output
from her2_monai.handlers.probabilities import ScenarioProbabilityCollector
from her2_monai.handlers.progress import ProgressBarHandler
from her2_monai.handlers.resume_state import FrozenByReference, RandomStates
from her2_monai.handlers.tracking import TrackingHandler

__all__ = [
    "AtomicFileSaver",
    "CheckpointHandler",
    "ResumeCheckpointLoader",
    "VerifiedCheckpointLoader",
    "BroadcastBuffers",
    "TranslationGridSaver",
    "scalar_output",
    "ScenarioProbabilityCollector",
    "ProgressBarHandler",
    "FrozenByReference",
    "RandomStates",
    "TrackingHandler",
]
