"""Shared fixtures for the test suite."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels are checked in Triton's interpreter; it must be chosen before
# the kernels are defined (they are imported lazily, after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch seed, so random inputs are reproducible."""
    torch.manual_seed(0)
    yield
