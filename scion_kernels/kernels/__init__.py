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

__all__ = ["available", "interpreting", "step_op", "unavailable_reason"]


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


#: Tags of the in-place step ops. Not CUDA-graph safe: a table seen for the first time is
#: copied from host memory, and a kept table can be evicted while a captured graph still
#: points at it, so the compiler must not capture them.
_STEP_TAGS = tuple(getattr(torch.Tag, n) for n in ("cudagraph_unsafe",) if hasattr(torch.Tag, n))


def step_op(name: str, impl: Callable[..., None]) -> Callable[..., None]:
    """Register ``impl(params, grads, bufs, ...)``, which updates the tensors of ``params`` and
    ``bufs`` in place and returns nothing, as the ``torch.library`` op
    ``scion_kernels::<name>``, and return the function that runs it.

    While ``torch.compile`` traces, that function calls the op (opaque to the compiler, one
    node per call). In eager mode it calls ``impl`` directly, which skips the dispatcher's
    layers (a tenth of a millisecond per call, several calls per step), and bumps the mutated
    tensors' version counters as the op would, so autograd still notices a parameter changed
    under a saved graph.
    """
    op = torch.library.custom_op(
        f"scion_kernels::{name}", mutates_args=("params", "bufs"), tags=_STEP_TAGS
    )(impl)
    op.register_fake(lambda *args: None)

    def run(*args: Any) -> None:
        if torch.compiler.is_compiling():
            op(*args)
            return
        impl(*args)
        torch.autograd.graph.increment_version([*args[0], *args[2]])

    run.__doc__ = impl.__doc__
    return run
