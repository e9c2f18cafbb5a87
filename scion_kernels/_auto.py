"""``backend="auto"``: the backend each parameter runs, from the committed timing table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend_table import TABLE
from ._util import eager_cache
from .norms import Norm, Spectral

__all__ = ["choose", "shape_class", "spectral_class"]


def shape_class(norm: Norm, shape: Sequence[int]) -> str:
    """The table's class of a parameter of ``shape`` under ``norm``."""
    norm = norm.pick(shape)
    if not isinstance(norm, Spectral):
        return "rowwise"
    return spectral_class(min(norm.matrix_shape(tuple(shape))[1:]))


def spectral_class(short: int) -> str:
    """The class of a Spectral matrix whose short side is ``short``."""
    if short < 256:
        return "spectral-small"
    return "spectral-medium" if short < 1024 else "spectral-large"


def choose(device: torch.device, kind: str) -> str:
    """The backend for class ``kind`` on ``device``: the table's choice where it has one and
    that backend can run there, else ``"torch"``."""
    return _choose(device, kind)


@eager_cache(maxsize=256)
def _choose(device: torch.device, kind: str) -> str:
    if device.type != "cuda":
        return "torch"
    backend = TABLE.get(torch.cuda.get_device_name(device), {}).get(kind, "torch")
    if backend == "triton":
        from .kernels import unavailable_reason
    elif backend == "cuda":
        from ._native import unavailable_reason
    else:
        return "torch"
    return backend if unavailable_reason(device) is None else "torch"
