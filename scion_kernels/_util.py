"""Small helpers shared by the package."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def eager_cache(maxsize: int | None = 4096) -> Callable[[F], F]:
    """Memoize a pure function of hashable arguments in eager mode; while ``torch.compile``
    traces, call it plainly (the compiler evaluates it once per graph anyway, and does not
    trace through caches)."""

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        def call(*args: Any) -> Any:
            if torch.compiler.is_compiling():
                return fn(*args)
            return cached(*args)

        call.__doc__, call.__name__, call.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap
