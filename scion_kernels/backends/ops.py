"""The package's ``torch.library`` ops: each schema and fake defined once, run by a backend.

Each op takes the name of the backend that runs it as its last argument (a schema holds no
objects); the registry (:mod:`.registry`) turns it back into the :class:`~.base.Backend`, whose
method of the op's name runs the kernels::

    scion_kernels::ns_step_(params, grads, bufs, tall, factors, m, n, dtype, coefficients,
                            gram, alpha, momentum, lr, coef, decay, backend)
                                                                     → Backend.ns_step_
        The whole step of one Newton–Schulz bucket, in place: every tensor of ``params`` is a
        stack of ``m×n`` matrices (``n×m`` where ``tall``), and for each matrix
        d ← (1 − α)·d + α·g (in ``bufs``; none given: d = g),
        x ← decay·x + coef·f·polar(d) (``f`` from ``factors``, one per tensor), ``polar`` the
        Newton–Schulz iteration in ``dtype`` with the flattened ``(a, b, c)`` triples (with
        ``gram``, on the Gram matrix where ``newton_schulz.uses_gram`` says so). With a
        tensor ``lr`` (one float32 element γ on the parameters' device, read by the kernels, so
        no value is fixed on the host), ``decay`` and ``coef`` are per unit of γ: the step is
        x ← (1 − decay·γ)·x + coef·γ·f·polar(d). With a tensor ``momentum`` (one float32
        element on the device) α is read from it by the kernels, and ``alpha`` is not used.

    scion_kernels::grouped_step_(params, grads, bufs, shapes, columns, q, eps, sign, whole,
                                 alpha, momentum, lr, coef, decay, backend)
                                                                     → Backend.grouped_step_
        Sign or ℓ2 groups of many tensors, in place: tensor ``i`` is seen as ``(-1, r, c)``
        matrices (``r, c = shapes[2i:2i+2]``, the same strides for ``x``, ``g`` and ``d``)
        whose groups are rows (columns where ``columns[i]``; the whole tensor with ``whole``);
        for every group d ← (1 − α)·d + α·g, x ← decay·x + coef·u with
        u = d/(‖d‖₂·q + ε), or u = sign(d)·q with ``sign``; ``momentum`` and ``lr`` as for
        ``ns_step_``.

    scion_kernels::polar(G, coefficients, dtype, gram, backend) -> Tensor  → Backend.polar_
        Newton–Schulz ``polar`` of every matrix of ``G`` (``(..., m, n)``) in ``dtype`` (with
        ``gram`` as for ``ns_step_``); ``G``'s shape, in ``dtype``.

While ``torch.compile`` traces, :func:`ns_step_`, :func:`grouped_step_` and :func:`polar` call
the ops (opaque to the compiler, one node per bucket). In eager mode they call the backend's
method directly, which skips the dispatcher's layers (a tenth of a millisecond per call,
several calls per step), and bump the mutated tensors' version counters as the op would, so
autograd still notices a parameter changed under a saved graph.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch import Tensor

from ..newton_schulz import check_matrices
from . import registry

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["NSStep", "GroupedStep", "ns_step_", "polar", "grouped_step_"]


class NSStep(NamedTuple):
    """The arguments of ``scion_kernels::ns_step_`` before ``backend`` (the op's schema)."""

    params: list[Tensor]
    grads: list[Tensor]
    bufs: list[Tensor]
    tall: list[bool]
    factors: list[float]
    m: int
    n: int
    dtype: torch.dtype
    coefficients: list[float]
    #: Iterate on the Gram matrix where :func:`~scion_kernels.newton_schulz.uses_gram` says so
    #: (``Spectral(polar="gram")``).
    gram: bool
    alpha: float
    momentum: Optional[Tensor]  # noqa: UP045 - the op schema is read from these hints
    lr: Optional[Tensor]  # noqa: UP045
    coef: float
    decay: float


class GroupedStep(NamedTuple):
    """The arguments of ``scion_kernels::grouped_step_`` before ``backend`` (the op's schema)."""

    params: list[Tensor]
    grads: list[Tensor]
    bufs: list[Tensor]
    shapes: list[int]
    columns: list[bool]
    q: list[float]
    eps: list[float]
    sign: bool
    whole: bool
    alpha: float
    momentum: Optional[Tensor]  # noqa: UP045 - the op schema is read from these hints
    lr: Optional[Tensor]  # noqa: UP045
    coef: float
    decay: float


#: Tags of the in-place step ops. Not CUDA-graph safe: a table seen for the first time is
#: copied from host memory, and a kept table can be evicted while a captured graph still
#: points at it, so the compiler must not capture them.
_STEP_TAGS = tuple(getattr(torch.Tag, n) for n in ("cudagraph_unsafe",) if hasattr(torch.Tag, n))


def _step_op(name: str, schema: type[tuple]) -> Callable[..., None]:
    """Define ``scion_kernels::<name>`` with ``schema``'s fields and ``backend: str`` as its
    arguments (``params`` and ``bufs`` mutated, nothing returned); return the function that
    runs it on a :class:`~.base.Backend`: the op while ``torch.compile`` traces, the backend's
    method ``name`` directly in eager mode (bumping the mutated tensors' version counters as the
    op would)."""
    hints = typing.get_type_hints(schema)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fields = [*schema._fields, "backend"]  # type: ignore[attr-defined]
    hints["backend"] = str

    def dispatch(*args: Any) -> None:
        getattr(registry.get(args[-1]), name)(*args[:-1])

    dispatch.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(f, kind, annotation=hints[f]) for f in fields], return_annotation=None
    )
    op = torch.library.custom_op(
        f"scion_kernels::{name}", dispatch, mutates_args=("params", "bufs"), tags=_STEP_TAGS
    )
    op.register_fake(lambda *args: None)

    def run(backend: Backend, *args: Any) -> None:
        if torch.compiler.is_compiling():
            op(*args, backend.name)
            return
        getattr(backend, name)(*args)
        torch.autograd.graph.increment_version([*args[0], *args[2]])

    run.__name__ = run.__qualname__ = name
    return run


#: ``ns_step_(backend, *args)``: the ``scion_kernels::ns_step_`` op (:class:`NSStep`).
ns_step_ = _step_op("ns_step_", NSStep)
#: ``grouped_step_(backend, *args)``: the ``scion_kernels::grouped_step_`` op
#: (:class:`GroupedStep`).
grouped_step_ = _step_op("grouped_step_", GroupedStep)


@torch.library.custom_op("scion_kernels::polar", mutates_args=())
def _polar_op(
    G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool, backend: str
) -> Tensor:
    return registry.get(backend).polar_(G, coefficients, dtype, gram)


@_polar_op.register_fake
def _(G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool, backend: str) -> Tensor:
    return G.new_empty(G.shape, dtype=dtype)


def polar(
    backend: Backend, G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool = False
) -> Tensor:
    """The ``scion_kernels::polar`` op: ``polar`` of every matrix of ``G`` with ``backend``'s
    kernels, ``coefficients`` the flattened ``(a, b, c)`` triples; ``G``'s shape in ``dtype``.
    ``gram``: in the Gram form where :func:`~scion_kernels.newton_schulz.uses_gram` says so."""
    check_matrices(G, "polar")
    return torch.ops.scion_kernels.polar(G, coefficients, dtype, gram, backend.name)
