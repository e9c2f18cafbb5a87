"""Shared fixtures for the test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch seed, so random inputs are reproducible."""
    torch.manual_seed(0)
    yield
