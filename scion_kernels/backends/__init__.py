"""The backends: what steps a parameter, as objects.

========  ================================================================================
name      what steps a parameter
========  ================================================================================
torch     the pure-PyTorch reference (:mod:`.reference`, the LMOs of
          :mod:`scion_kernels.norms`): every norm, any device
triton    the Triton kernels (:mod:`.triton`), imported on first use
cuda      the native CUDA C++ kernels (:mod:`.cuda`, module ``scion_kernels._C``), imported
          on first use
auto      per device and shape class, the backend the committed timing table
          (:mod:`.auto_table`, from ``python -m bench.choose_backends``) names; the reference
          where it names none or that backend cannot run
========  ================================================================================

Each backend is a :class:`~.base.Backend` object in the registry (:mod:`.registry`), with its
:class:`~.base.Capabilities` as data. A param group is resolved once by :func:`route` (when it
is added, or when its ``backend``, ``norm``, ``norm_kwargs`` or its parameters' shapes, dtypes
or devices change) into a :class:`Route`: per parameter, the backend object that steps it and
the norm it runs. A parameter the chosen backend does not take (:meth:`~.base.Backend.refusal`:
a norm, dtype, step count or layout outside its capabilities) falls back to the reference
there, with the reason kept in :attr:`Route.fallbacks` (shown by ``print(optimizer)`` and
:func:`scion_kernels.format_groups`), never inside a kernel call. The fused backends share one
plan (:mod:`.plan`) and run their kernels through the package's ops (:mod:`.ops`). See
``README.md`` in this folder for where a new backend, op or architecture goes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._util import eager_cache
from ..newton_schulz import gram_refusal, orient
from ..norms import Norm, Spectral, make_norm
from . import ops
from .auto_table import TABLE
from .base import Backend, Capabilities, Update
from .cuda import NativeBackend
from .reference import Reference
from .registry import get, names, register, using
from .tables import flatten
from .triton import TritonBackend

__all__ = [
    "Backend", "Capabilities", "NativeBackend", "Reference", "Route", "TritonBackend", "Update",
    "choose", "get", "names", "native_available", "register", "route", "shape_class",
    "spectral_class", "summary", "using",
]  # fmt: skip

register(Reference())
register(TritonBackend())
register(NativeBackend())


def native_available() -> bool:
    """Whether the native module ``scion_kernels._C`` was built and imports. Never raises."""
    from .cuda.native import native_available

    return native_available()


# ----------------------------------------------------------------------------- backend="auto"


#: The suffix of the classes of matrices the Gram form runs on (``spectral-large-gram``).
GRAM_SUFFIX = "-gram"


def shape_class(norm: Norm, shape: Sequence[int], device: torch.device) -> str:
    """The timing table's class of a parameter of ``shape`` under ``norm`` on ``device``:
    ``grouped``, or its :func:`spectral_class`, with ``-gram`` where the norm's
    ``polar="gram"`` runs the Gram form on each of its matrices (:meth:`Spectral.runs_gram`,
    in its compute dtype there; a ``split`` tensor's blocks each)."""
    norm = norm.pick(shape)
    if not isinstance(norm, Spectral):
        return "grouped"
    kind = spectral_class(min(norm.matrix_shape(tuple(shape))[1:]))
    dtype = norm.compute_dtype(device)
    gram = all(norm.runs_gram(*sorted(block), dtype) for block in norm.block_shapes(shape))
    return kind + GRAM_SUFFIX if gram else kind


def spectral_class(short: int) -> str:
    """The class of a Spectral matrix whose short side is ``short``."""
    if short < 256:
        return "spectral-small"
    return "spectral-medium" if short < 1024 else "spectral-large"


@eager_cache(maxsize=256)
def choose(device: torch.device, kind: str) -> str:
    """The backend for class ``kind`` on ``device``: the table's choice where it has one and
    that backend can run there, else ``"torch"``; a ``-gram`` class the table does not list
    takes its plain class's choice (kept per device and class; a test that changes the table
    calls ``choose.cache_clear()``)."""
    if device.type != "cuda":
        return "torch"
    row = TABLE.get(torch.cuda.get_device_name(device), {})
    name = row.get(kind, row.get(kind.removesuffix(GRAM_SUFFIX), "torch"))
    if name == "auto" or name not in names() or get(name).unavailable_reason(device) is not None:
        return "torch"
    return name


# ------------------------------------------------------------------------------ param groups


@dataclass(frozen=True)
class Route:
    """How one param group steps: its ``norm`` and, per parameter, the backend that steps it,
    the norm that backend runs (``Auto`` picked), and why it fell back to the reference where
    it did. Resolved from the group's options as they were; see :meth:`matches`."""

    backend: str
    norm_option: Any
    norm_kwargs: dict[str, Any]
    norm: Norm
    #: Each parameter's shape, dtype and device when the route was made.
    shapes: tuple[tuple[torch.Size, torch.dtype, torch.device], ...]
    #: Per parameter, the backend object that steps it (the reference included).
    backends: tuple[Backend, ...]
    #: Per parameter, the norm it runs (``Auto`` picked for its shape).
    norms: tuple[Norm, ...]
    #: Per parameter, why the chosen backend left it to the reference (``"triton does not take
    #: 20 Newton–Schulz steps"``), or ``None``.
    fallbacks: tuple[str | None, ...]
    #: Per parameter, its fused backend's polar factor for a Spectral norm (one function per
    #: backend and norm, so the distributed step batches them), else ``None``.
    polars: tuple[Callable[[Tensor], Tensor] | None, ...]

    def matches(self, group: dict[str, Any]) -> bool:
        """Whether ``group`` still has the options and parameters (their shapes, dtypes and
        devices: a model moved or cast after the optimizer was made) this route was made for."""
        norm = group["norm"]
        return (
            (norm is self.norm_option or (isinstance(norm, str) and norm == self.norm_option))
            and group.get("backend") == self.backend
            and group["norm_kwargs"] == self.norm_kwargs
            and len(group["params"]) == len(self.shapes)
            and all(
                p.shape == shape and p.dtype == dtype and p.device == device
                for p, (shape, dtype, device) in zip(group["params"], self.shapes, strict=True)
            )
        )

    def newton_schulz(self, i: int) -> str:
        """How parameter ``i`` is orthogonalized: the Newton–Schulz compute dtype its backend
        uses (``"bfloat16 (auto)"`` when chosen, not given; ``", gram"`` added for
        ``polar="gram"``, or why the parameter does not take the Gram form), ``"svd
        (float64)"``, or ``""`` for norms that do not orthogonalize."""
        picked = self.norms[i]
        if not isinstance(picked, Spectral):
            return ""
        if picked.polar == "svd":
            return "svd (float64)"
        dtype = self.backends[i].compute_dtype(picked, self.shapes[i][2])
        name = str(dtype).removeprefix("torch.")
        name = f"{name} (auto)" if picked.ns_dtype is None else name
        if picked.precondition is not None:
            name = f"{name}, {picked.precondition.upper()}"
        if picked.polar != "gram":
            return name
        why = gram_refusal(picked.table, dtype)
        if picked.precondition is not None:
            why = f"{picked.precondition.upper()} preconditioning"
        if why is None and not any(
            picked.runs_gram(*orient(r, c)[:2], dtype)
            for r, c in picked.block_shapes(self.shapes[i][0])
        ):
            why = "its matrices are squarer than 2:1"
        return f"{name}, gram" if why is None else f"{name} (not gram: {why})"

    def describe(self, i: int) -> str:
        """What steps parameter ``i``: a backend's name, with the reason where it fell back."""
        why = self.fallbacks[i]
        return self.backends[i].name + ("" if why is None else f" ({why})")


def summary(route: Route) -> str:
    """One line per backend of ``route``: ``"triton"``, ``"torch (triton does not take …): 2
    parameters"``."""
    counts: dict[str, int] = {}
    for i in range(len(route.backends)):
        counts[route.describe(i)] = counts.get(route.describe(i), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{what}: {n} parameter{'s' * (n != 1)}" for what, n in counts.items())


def _polar(backend: Backend, norm: Spectral, device: torch.device) -> Callable[[Tensor], Tensor]:
    """``polar`` of a stack of matrices with ``norm``'s coefficients by ``backend``'s kernels in
    its compute dtype (what :meth:`Spectral.lmo_many` takes as ``polar``)."""
    coefficients, dtype = flatten(norm.table), backend.compute_dtype(norm, device)
    gram = norm.polar == "gram"
    return lambda G: ops.polar(backend, G, coefficients, dtype, gram)


def route(
    group: dict[str, Any], where: str, norm: Norm | None = None, capturable: bool = False
) -> Route:
    """Resolve ``group`` (``where`` names it in errors; ``norm``: its norm, if already made)
    for a ``capturable`` optimizer or not: raises ``ValueError`` when it names a fused backend
    that cannot run on one of its parameters' devices."""
    option = group["backend"]
    if norm is None:
        norm = make_norm(group["norm"], group["norm_kwargs"])
    params: list[Tensor] = group["params"]
    if option == "auto":
        chosen = [get(choose(p.device, shape_class(norm, p.shape, p.device))) for p in params]
    else:
        backend = get(option)
        for device in {p.device for p in params}:
            reason = backend.unavailable_reason(device)
            if reason is not None:
                raise ValueError(f"backend {option!r} ({where}): {reason}")
        chosen = [backend] * len(params)
    backends: list[Backend] = []
    fallbacks: list[str | None] = []
    polars: list[Callable[[Tensor], Tensor] | None] = []
    made: dict[tuple[str, int, torch.device], Callable[[Tensor], Tensor]] = {}
    buffer_dtype = group.get("buffer_dtype")
    for p, backend in zip(params, chosen, strict=True):
        why = backend.refusal(norm, p.shape, p.dtype, p.device, buffer_dtype, capturable)
        if why is not None:
            why, backend = f"{backend.name} does not take {why}", get("torch")
        backends.append(backend)
        fallbacks.append(why)
        picked = norm.pick(p.shape)
        if not backend.fused or not isinstance(picked, Spectral):
            polars.append(None)
            continue
        key = (backend.name, id(picked), p.device)
        if key not in made:
            made[key] = _polar(backend, picked, p.device)
        polars.append(made[key])
    options = copy.deepcopy(group["norm_kwargs"])  # in-place changes to them must not match
    shapes = tuple((p.shape, p.dtype, p.device) for p in params)
    picked_norms = tuple(norm.pick(p.shape) for p in params)
    return Route(
        option, group["norm"], options, norm, shapes, tuple(backends), picked_norms,
        tuple(fallbacks), tuple(polars),
    )  # fmt: skip
