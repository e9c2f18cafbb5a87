"""A backend that records the kernel calls of another and runs them: registered with
:func:`scion_kernels.backends.using` under the other's name, it lets a test count the op calls
a step makes, and see their shapes, without touching any backend's internals."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scion_kernels.backends import Backend


class Recording(Backend):
    """``inner`` with every kernel call recorded in :attr:`calls` as ``(op, args)``."""

    fused = True

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def unavailable_reason(self, device: torch.device) -> str | None:
        return self.inner.unavailable_reason(device)

    def compute_dtype(self, norm: Any, device: torch.device) -> torch.dtype:
        return self.inner.compute_dtype(norm, device)

    def refusal(self, *args: Any) -> str | None:
        return self.inner.refusal(*args)

    def ns_step_(self, *args: Any) -> None:
        self.calls.append(("ns_step_", args))
        self.inner.ns_step_(*args)

    def grouped_step_(self, *args: Any) -> None:
        self.calls.append(("grouped_step_", args))
        self.inner.grouped_step_(*args)

    def polar_(
        self, G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool = False
    ) -> Tensor:
        self.calls.append(("polar", (G, coefficients, dtype, gram)))
        return self.inner.polar_(G, coefficients, dtype, gram)

    def of(self, op: str) -> list[tuple[Any, ...]]:
        """The arguments of every call of ``op``, in order."""
        return [args for name, args in self.calls if name == op]
