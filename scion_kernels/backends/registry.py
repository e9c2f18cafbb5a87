"""The registry: the one place a backend's name is turned into its object.

The backends register themselves when :mod:`scion_kernels.backends` is imported (``torch``,
``triton``, ``cuda``). :func:`using` swaps one for another object of the same name for the
length of a ``with`` block: how tests run a backend with another policy (forced tile sizes, a
host emulation of the native module) without touching its internals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["get", "names", "register", "using"]

_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` under its name (which must be new); returns it."""
    if not backend.name or backend.name == "auto" or backend.name in _BACKENDS:
        raise ValueError(f"cannot register a backend named {backend.name!r}")
    _BACKENDS[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The backend registered as ``name``."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown backend {name!r}; expected one of {names()}")
    return backend


def names() -> tuple[str, ...]:
    """The ``backend`` option's values: ``"auto"`` and every registered backend's name."""
    return ("auto", *_BACKENDS)


@contextlib.contextmanager
def using(backend: Backend) -> Iterator[Backend]:
    """Run ``backend`` wherever its name is asked for, until the block ends (routes built
    inside the block hold it; the one it replaces comes back afterwards)."""
    previous = get(backend.name)
    _BACKENDS[backend.name] = backend
    try:
        yield backend
    finally:
        _BACKENDS[backend.name] = previous
