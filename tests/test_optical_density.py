"""The one optical-density definition: Beer-Lambert against a white reference, for numpy and torch alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from her2_monai.optical_density import (
    BLACK_OFFSET,
    MIN_TRANSMISSION,
    intensity_from_optical_density,
    optical_density,
)


def test_glass_reads_no_absorption_and_brighter_than_glass_is_not_negative() -> None:
    glass = np.array([240.0, 236.0, 250.0])
    od = optical_density(np.stack([glass, glass + 10.0]), glass)
    assert np.all(od == 0.0)


def test_black_is_bounded_by_the_floor_or_the_offset() -> None:
    assert optical_density(np.zeros(1))[0] == pytest.approx(-math.log(MIN_TRANSMISSION))
    assert optical_density(np.zeros(1), offset=BLACK_OFFSET, floor=0.0)[0] == pytest.approx(math.log(256.0))
    with pytest.raises(ValueError, match="floor or offset"):
        optical_density(np.zeros(1), floor=0.0)


@pytest.mark.parametrize("offset", [0.0, BLACK_OFFSET])
def test_inverse_round_trips_and_numpy_matches_torch(offset: float) -> None:
    rgb = np.random.default_rng(0).uniform(5.0, 250.0, (4, 5, 3))
    white = np.array([252.0, 248.0, 255.0])
    od = optical_density(rgb, white, offset=offset)
    np.testing.assert_allclose(intensity_from_optical_density(od, white, offset=offset), rgb, rtol=1e-12)
    od_t = optical_density(torch.from_numpy(rgb), torch.from_numpy(white), offset=offset)
    np.testing.assert_allclose(od_t.numpy(), od, rtol=1e-12)


def test_stain_amounts_add_in_optical_density() -> None:
    """Two filters of transmission 1/2 and 1/4 in a row transmit 1/8: their ODs add."""
    half, quarter = optical_density(np.array([127.5, 63.75]))
    assert half + quarter == pytest.approx(-math.log(1.0 / 8.0))
