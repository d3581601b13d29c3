"""Flags from the command line arrive as strings: "--amp false" must switch mixed precision off."""

from __future__ import annotations

import pytest
import torch

from her2_monai.engines.evaluators import ScenarioEvaluator
from her2_monai.engines.gan_trainer import CrossModalGANTrainer
from her2_monai.networks.cmgan import CrossModalDiscriminators, CrossModalGAN
from her2_monai.utils import as_bool


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (0, False),
        (1, True),
        ("true", True),
        ("False", False),
        (" off ", False),
        ("yes", True),
    ],
)
def test_as_bool_reads_command_line_spellings(value, expected):
    assert as_bool(value) is expected


def test_as_bool_rejects_other_strings_naming_the_flag():
    with pytest.raises(ValueError, match="amp must be a boolean"):
        as_bool("maybe", "amp")


def test_engines_read_string_flags():
    gan, discs = CrossModalGAN(ngf=4, n_blocks=1), CrossModalDiscriminators(ndf=4)
    optim = torch.optim.Adam(gan.parameters())
    trainer = CrossModalGANTrainer("cpu", 1, [], gan, discs, optim, optim, amp="false", channels_last="false")
    assert trainer.amp is False and trainer.channels_last is False
    evaluator = ScenarioEvaluator("cpu", [], torch.nn.Identity(), amp="true", channels_last="0")
    assert evaluator.amp is True and evaluator.channels_last is False
