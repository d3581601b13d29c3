"""Shared fixtures: location of the real-image fixtures in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real histology fixtures; tests using it skip when it is absent."""
    if not (SHARED_DATA / "bci").is_dir():
        pytest.skip(f"real-image fixtures not found at {SHARED_DATA} (they sit beside the repository in CI)")
    return SHARED_DATA
