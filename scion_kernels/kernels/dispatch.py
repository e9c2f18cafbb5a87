"""Which parameters of a group the fused kernels take, and one op call per bucket.

A Spectral-family parameter (``Spectral``, ``SpectralConv``, or what ``Auto`` picks for it) with
Newton–Schulz in bf16 or fp16 (``ns_dtype=None`` is bf16 here: the kernels run on GPUs) is taken
when its matrices are a reshape of it (not ``split`` blocks, not a transposed conv's) and its
parameter, gradient and buffer can all be seen as them without a copy; Sign,
ColNorm, RowNorm and BiasRMS parameters when the three share one such layout. Everything else
stays on the reference path. Taken Spectral parameters are bucketed by oriented shape, dtypes
and coefficient set, one ``ns_step_`` op call per bucket; the row-wise ones go by kind and
dtypes, one ``rowwise_step_`` op call each. The Triton backend's ops are ``scion_kernels::
ns_step_`` and ``scion_kernels::rowwise_step_``, the native backend's ``scion_kernels::
native_ns_step_`` and ``scion_kernels::native_rowwise_step_``.

This module imports no Triton: the Triton ops are imported when ``backend="triton"`` first
steps, so the native backend runs where Triton is not installed. The planning looks only at
shapes, strides, dtypes and norms (never at data or addresses), so ``torch.compile
(fullgraph=True)`` traces it into those op calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _native
from ..norms import BiasRMS, ColNorm, Norm, RowNorm, Sign, Spectral
from . import step_op
from .tables import flatten, view_strides, writable

__all__ = ["ROWWISE_NORMS", "fused_norm", "fused_step_", "kernel_dtype", "spectral_step_"]

_NS_DTYPES = (torch.bfloat16, torch.float16)
ROWWISE_NORMS = (Sign, ColNorm, RowNorm, BiasRMS)  # RowNorm subclasses ColNorm

#: The native (``backend="cuda"``) steps, as ops ``scion_kernels::native_ns_step_`` (one call per
#: Newton–Schulz bucket) and ``scion_kernels::native_rowwise_step_`` (one per row-wise launch).
native_ns_step_op = step_op("native_ns_step_", _native.ns_step_)
native_rowwise_step_op = step_op("native_rowwise_step_", _native.rowwise_step_)


def _ops(backend: str) -> tuple[Callable[..., None], Callable[..., None]]:
    """``backend``'s (Newton–Schulz bucket, row-wise launch) ops."""
    if backend == "cuda":
        return native_ns_step_op, native_rowwise_step_op
    from .newton_schulz import ns_step_op
    from .rowwise import rowwise_step_op

    return ns_step_op, rowwise_step_op


def kernel_dtype(norm: Spectral) -> torch.dtype:
    """The Newton–Schulz operand dtype the kernels use for ``norm``: its compute dtype on a GPU,
    where they run (also when Triton's interpreter runs them on a CPU)."""
    return norm.compute_dtype("cuda")


def fused_norm(norm: Norm, shape: Sequence[int]) -> Norm | None:
    """The norm the kernels (Triton or native: the same set) run for a parameter of ``shape``
    (``Auto`` resolved), or ``None``."""
    norm = norm.pick(shape)
    if isinstance(norm, Spectral):
        ok = norm.polar == "newton_schulz" and kernel_dtype(norm) in _NS_DTYPES
        return norm if ok and norm.plain_reshape() else None
    return norm if isinstance(norm, ROWWISE_NORMS) else None


def fused_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Norm],
    backend: str = "triton",
    **options: Any,
) -> list[int]:
    """The Scion step on every parameter ``backend``'s kernels take (``norms`` from
    :func:`fused_norm`); returns the indices of the others. ``options``: ``alpha``, ``lr``,
    ``scale``, ``constrained``."""
    left: list[int] = []
    ns_op, row_op = _ops(backend)
    for spectral, step in ((True, spectral_step_), (False, rowwise_step_)):
        idx = [i for i, n in enumerate(norms) if isinstance(n, Spectral) == spectral]
        if not idx:
            continue
        rest = step(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            None if bufs is None else [bufs[i] for i in idx],
            [norms[i] for i in idx],
            **options,
            op=ns_op if spectral else row_op,
        )
        left.extend(idx[j] for j in rest)
    return sorted(left)


def spectral_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Spectral],
    *,
    alpha: float,
    lr: float,
    scale: float,
    constrained: bool,
    op: Callable[..., None],
) -> list[int]:
    """The whole Scion step for the parameters the kernels can take; returns the others.

    For each taken parameter ``x`` (gradient ``g``, buffer ``d`` or none when ``bufs`` is
    ``None``)::

        d ← (1 − α)·d + α·g;   x ← (1 − γ)·x − γ·ρ·s·polar(d)   (or x ← x − γ·ρ·s·polar(d))

    One ``op`` call (``scion_kernels::ns_step_``, or the native one) per bucket. Returns the
    indices of the parameters left for the reference path.
    """
    left: list[int] = []
    buckets: dict[tuple, list[tuple[int, bool]]] = {}
    for i, (p, g, norm) in enumerate(zip(params, grads, norms, strict=True)):
        d = None if bufs is None else bufs[i]
        shape = norm.matrix_shape(p.shape)
        tensors = (p, g) if d is None else (p, g, d)
        views = all(view_strides(t.shape, t.stride(), shape) is not None for t in tensors)
        if not views or not all(writable(t) for t in tensors if t is not g):
            left.append(i)
            continue
        r, c = shape[1:]
        key = (
            p.device, min(r, c), max(r, c), kernel_dtype(norm), norm.table,
            p.dtype, g.dtype, None if d is None else d.dtype,
        )  # fmt: skip
        buckets.setdefault(key, []).append((i, r > c))

    decay = 1.0 - lr if constrained else 1.0
    for key, members in buckets.items():
        _, m, n, ns_dtype, table = key[:5]
        idx = [i for i, _ in members]
        op(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [] if bufs is None else [bufs[i] for i in idx],
            [tall for _, tall in members],
            [norms[i].scale_for(params[i].shape) for i in idx],
            m,
            n,
            ns_dtype,
            flatten(table),
            alpha,
            -lr * scale,
            decay,
        )
    return left


def _layout(norm: Norm, t: Tensor) -> tuple[tuple[int, int, int], bool]:
    """The ``(B, r, c)`` matrices ``t`` is seen as, and whether the groups are their columns."""
    if isinstance(norm, BiasRMS):
        return (1, 1, t.numel()), False
    # ColNorm's groups are columns; `transpose` (ColNorm, RowNorm) swaps rows and columns.
    columns = type(norm) is ColNorm
    if isinstance(norm, ColNorm) and norm.transpose:
        columns = not columns
    return norm.matrix_shape(t.shape), columns


def _factors(norm: Norm, shape: Sequence[int], groups: int, length: int) -> tuple[float, float]:
    """``(q or f, ε)`` for one matrix whose groups are ``groups`` × ``length``."""
    if isinstance(norm, Sign):
        return norm.factor(shape), 0.0
    if isinstance(norm, BiasRMS):
        return 1.0 / math.sqrt(max(length, 1)), norm.eps
    if isinstance(norm, RowNorm):  # groups are rows of the oriented matrix, of length d_in
        return (math.sqrt(length) if norm.normalized else 1.0), norm.eps
    assert isinstance(norm, ColNorm)  # groups are columns of length d_out; d_in of them
    return (groups if norm.normalized else 1.0) / math.sqrt(length), norm.eps


def rowwise_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Norm],
    *,
    alpha: float,
    lr: float,
    scale: float,
    constrained: bool,
    op: Callable[..., None],
) -> list[int]:
    """The whole step for Sign/ColNorm/RowNorm/BiasRMS parameters; returns the ones left.

    ``x ← (1 − γ)·x − γ·ρ·lmo(d)`` (or ``x ← x − γ·ρ·lmo(d)``) after ``d ← (1 − α)·d + α·g``
    (``bufs`` ``None``: ``d = g``), one ``op`` call (``scion_kernels::rowwise_step_`` or the
    native one) per kind and dtype combination. A parameter whose ``x``, ``g`` and ``d``
    cannot all be seen as the same strided matrices without a copy is left for the reference
    path.
    """
    left: list[int] = []
    launches: dict[tuple, list[tuple[int, int, int, bool, float, float]]] = {}
    for i, (p, g, norm) in enumerate(zip(params, grads, norms, strict=True)):
        d = g if bufs is None else bufs[i]
        shape, columns = _layout(norm, p)
        strides = view_strides(p.shape, p.stride(), shape)
        same = all(
            t.stride() == p.stride() or view_strides(t.shape, t.stride(), shape) == strides
            for t in (g, d)
        )
        if strides is None or not same or not writable(p):  # same strides: d is writable too
            left.append(i)
            continue
        r, c = shape[1:]
        groups, length = (c, r) if columns else (r, c)
        q, eps = _factors(norm, p.shape, groups, length)
        kind = (isinstance(norm, Sign), isinstance(norm, BiasRMS))
        key = (p.device, *kind, p.dtype, g.dtype, d.dtype)
        launches.setdefault(key, []).append((i, r, c, columns, q, eps))

    decay = 1.0 - lr if constrained else 1.0
    for (_, sign, whole, *_), members in launches.items():
        idx = [member[0] for member in members]
        op(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [] if bufs is None else [bufs[i] for i in idx],
            [v for member in members for v in member[1:3]],
            [member[3] for member in members],
            [member[4] for member in members],
            [member[5] for member in members],
            sign,
            whole,
            alpha,
            -lr * scale,
            decay,
        )
    return left
