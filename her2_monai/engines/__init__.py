"""MONAI engines: the stage trainers and the evaluators of classification (per scenario) and stain translation."""

from __future__ import annotations

from her2_monai.engines.base import AmpTrainer
from her2_monai.engines.evaluators import ScenarioEvaluator, TranslationEvaluator
from her2_monai.engines.gan_trainer import CrossModalGANTrainer
from her2_monai.engines.her2_trainer import HER2Trainer

__all__ = ["AmpTrainer", "CrossModalGANTrainer", "HER2Trainer", "ScenarioEvaluator", "TranslationEvaluator"]
