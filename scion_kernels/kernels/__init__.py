"""Hand-written Triton kernels for the Scion step (``backend="triton"``).

Importing :mod:`.newton_schulz` and :mod:`.rowwise` registers them as the ``"triton"``
implementations of the package's ops (:mod:`scion_kernels._ops`). Import is lazy and optional:
without Triton the package still works on the reference path, and :func:`available` says why
the kernels cannot run. On CPU tensors the kernels run only under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them without a
GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["available", "interpreting", "on_device", "unavailable_reason"]


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or ``None`` if they can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton is a dependency here
        return f"Triton is not installed ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (
        f"the Triton kernels run on CUDA tensors (got a {device.type} tensor); on CPU they run "
        "only in Triton's interpreter (TRITON_INTERPRET=1), which is meant for testing"
    )


def available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernels can run on ``device``."""
    return unavailable_reason(torch.device(device)) is None


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while kernels launch: Triton launches on the current CUDA
    device and its current stream, whatever device the tensors are on (parameters on
    ``cuda:1`` with ``cuda:0`` current would fault or read across devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
