"""The backends, and the one place a backend name is turned into code.

========  ================================================================================
name      what steps a parameter
========  ================================================================================
torch     the pure-PyTorch reference (:mod:`scion_kernels.norms`): every norm, any device
triton    the Triton kernels (:mod:`scion_kernels.kernels`), imported on first use
cuda      the native CUDA C++ kernels (:mod:`scion_kernels._native`, module ``_C``), imported
          on first use
auto      per device and shape class, the backend the committed timing table
          (``_backend_table.py``, from ``python -m bench.choose_backends``) names; the
          reference where it names none or that backend cannot run
========  ================================================================================

A param group is resolved once by :func:`route` (when it is added, or when its ``backend``,
``norm``, ``norm_kwargs`` or its parameters' shapes or devices change) into a :class:`Route`:
its norm and, per parameter, the fused backend that steps it and the norm its kernels run, or
nothing (the reference). The fused backends share one plan (:mod:`scion_kernels._plan`) and
run their kernels through the package's ops (:mod:`scion_kernels._ops`); a parameter they
cannot take at step time (a layout that needs a copy) falls back to the reference in the same
step. Nothing here imports Triton or the native module until a group names a backend that
needs it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _ops, _plan
from ._backend_table import TABLE
from ._tables import flatten
from ._util import eager_cache
from .norms import Norm, Spectral, make_norm

__all__ = [
    "NAMES", "Backend", "Route", "choose", "get", "native_available", "route", "shape_class",
    "spectral_class",
]  # fmt: skip

NAMES = ("auto", "torch", "triton", "cuda")


def _triton_reason(device: torch.device) -> str | None:
    from .kernels import unavailable_reason

    return unavailable_reason(device)


def _triton_load() -> None:
    from .kernels import newton_schulz, rowwise  # noqa: F401  (registers the op implementations)


def _native_reason(device: torch.device) -> str | None:
    from ._native import unavailable_reason

    return unavailable_reason(device)


def _native_load() -> None:
    from . import _native  # noqa: F401  (registers the op implementations)


class Backend:
    """A fused backend: its kernels take the whole step of the parameters :func:`_plan.fused_norm`
    admits, and compute polar factors for the distributed step."""

    def __init__(
        self,
        name: str,
        reason: Callable[[torch.device], str | None],
        load: Callable[[], None],
    ) -> None:
        self.name = name
        self._reason = reason
        self._load = load
        self._loaded = False

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why the kernels cannot run on ``device``, or ``None`` if they can."""
        return self._reason(device)

    def load(self) -> None:
        """Import the kernels, which registers them as this backend's op implementations."""
        if not self._loaded:
            self._load()
            self._loaded = True

    def step_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        bufs: Sequence[Tensor] | None,
        norms: Sequence[Norm],
        update: _plan.Update,
    ) -> list[int]:
        """The fused step on every parameter the kernels take at these strides; returns the
        indices of the others."""
        return _plan.fused_step_(params, grads, bufs, norms, self.name, update)

    def polar(self, norm: Spectral) -> Callable[[Tensor], Tensor]:
        """The polar factor of a stack of wide matrices with ``norm``'s coefficients, in the
        kernels' compute dtype (what :meth:`Spectral.lmo_many` takes as ``polar``)."""
        coefficients, dtype = flatten(norm.table), _plan.kernel_dtype(norm)
        return lambda G: _ops.polar(G, coefficients, dtype, self.name)


_FUSED = {
    "triton": Backend("triton", _triton_reason, _triton_load),
    "cuda": Backend("cuda", _native_reason, _native_load),
}


def get(name: str) -> Backend | None:
    """The fused backend called ``name``, or ``None`` for the reference (``"torch"``)."""
    if name == "torch":
        return None
    if name not in _FUSED:
        raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")
    return _FUSED[name]


def native_available() -> bool:
    """Whether the native module ``scion_kernels._C`` was built and imports. Never raises."""
    from ._native import native_available

    return native_available()


# ----------------------------------------------------------------------------- backend="auto"


def shape_class(norm: Norm, shape: Sequence[int]) -> str:
    """The timing table's class of a parameter of ``shape`` under ``norm``."""
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
    name = TABLE.get(torch.cuda.get_device_name(device), {}).get(kind, "torch")
    backend = _FUSED.get(name)
    if backend is None or backend.unavailable_reason(device) is not None:
        return "torch"
    return name


# ------------------------------------------------------------------------------ param groups


@dataclass(frozen=True)
class Route:
    """How one param group steps: its ``norm`` and, per parameter, ``(backend, kernel norm)``
    or ``None`` (the reference). Resolved from the group's options as they were; see
    :meth:`matches`."""

    backend: str
    norm_option: Any
    norm_kwargs: dict[str, Any]
    norm: Norm
    #: Each parameter's shape and device when the route was made.
    layout: tuple[tuple[torch.Size, torch.device], ...]
    kernels: tuple[tuple[Backend, Norm] | None, ...]
    #: Per parameter, its backend's polar factor for a Spectral kernel norm (one function per
    #: backend and norm, so the distributed step batches them), else ``None``.
    polars: tuple[Callable[[Tensor], Tensor] | None, ...]

    def matches(self, group: dict[str, Any]) -> bool:
        """Whether ``group`` still has the options and parameters (their shapes and devices:
        a model moved after the optimizer was made) this route was made for."""
        norm = group["norm"]
        return (
            (norm is self.norm_option or (isinstance(norm, str) and norm == self.norm_option))
            and group.get("backend") == self.backend
            and group["norm_kwargs"] == self.norm_kwargs
            and len(group["params"]) == len(self.layout)
            and all(
                p.shape == shape and p.device == device
                for p, (shape, device) in zip(group["params"], self.layout, strict=True)
            )
        )


def route(group: dict[str, Any], where: str) -> Route:
    """Resolve ``group`` (``where`` names it in errors): raises ``ValueError`` when it names a
    fused backend that cannot run on one of its parameters' devices."""
    name, norm = group["backend"], make_norm(group["norm"], group["norm_kwargs"])
    params: list[Tensor] = group["params"]
    chosen: list[Backend | None]
    if name == "auto":
        chosen = [get(choose(p.device, shape_class(norm, p.shape))) for p in params]
    else:
        backend = get(name)
        if backend is not None:
            for device in {p.device for p in params}:
                reason = backend.unavailable_reason(device)
                if reason is not None:
                    raise ValueError(f"backend {name!r} ({where}): {reason}")
        chosen = [backend] * len(params)
    kernels: list[tuple[Backend, Norm] | None] = []
    polars: list[Callable[[Tensor], Tensor] | None] = []
    made: dict[tuple[str, int], Callable[[Tensor], Tensor]] = {}
    for p, backend in zip(params, chosen, strict=True):
        kernel_norm = None if backend is None else _plan.fused_norm(norm, p.shape)
        if backend is None or kernel_norm is None:
            kernels.append(None)
            polars.append(None)
            continue
        backend.load()
        kernels.append((backend, kernel_norm))
        if isinstance(kernel_norm, Spectral):
            key = (backend.name, id(kernel_norm))
            if key not in made:
                made[key] = backend.polar(kernel_norm)
            polars.append(made[key])
        else:
            polars.append(None)
    options = copy.deepcopy(group["norm_kwargs"])  # in-place changes to them must not match
    layout = tuple((p.shape, p.device) for p in params)
    return Route(name, group["norm"], options, norm, layout, tuple(kernels), tuple(polars))
