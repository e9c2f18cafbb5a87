"""Hand-written Triton kernels for the Scion step (``backend="triton"``).

Import is lazy and optional: without Triton the package still works on the reference path, and
:func:`available` says why the kernels cannot run. On CPU tensors the kernels run only under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them without a
GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["available", "call_op", "interpreting", "unavailable_reason"]


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


def call_op(op: Callable[..., Any], impl: Callable[..., Any], *args: Any) -> None:
    """Run an in-place kernel op: ``op(params, grads, bufs, ...)`` updates the tensors of its
    first and third arguments.

    While ``torch.compile`` traces, through the registered ``torch.library`` op ``op`` (opaque
    to the compiler, one node per call). In eager mode the implementation ``impl`` is called
    directly, which skips the dispatcher's layers (a tenth of a millisecond per call, several
    calls per step), and the mutated tensors' version counters are bumped as the op would, so
    autograd still notices a parameter changed under a saved graph.
    """
    if torch.compiler.is_compiling():
        op(*args)
        return
    impl(*args)
    torch.autograd.graph.increment_version([t for group in args[:1] + args[2:3] for t in group])
