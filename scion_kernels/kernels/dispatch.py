"""Which parameters of a group the Triton kernels take, and one op call per bucket.

A Spectral-family parameter (``Spectral``, ``SpectralConv``, or what ``Auto`` picks for it) with
Newton–Schulz in bf16 or fp16 is taken when its parameter, gradient and buffer can all be seen
as matrices without a copy; Sign, ColNorm, RowNorm and BiasRMS parameters when the three share
one such layout. Everything else stays on the reference path. Taken Spectral parameters are
bucketed by oriented shape, dtypes and coefficient set, one ``scion_kernels::ns_step_`` call per
bucket; the row-wise ones go by kind and dtypes, one ``scion_kernels::rowwise_step_`` call each.

This code looks only at shapes, strides, dtypes and norms (never at data or addresses), so
``torch.compile(fullgraph=True)`` traces it into those op calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _native
from ..norms import Norm, Spectral
from . import step_op
from .newton_schulz import flatten, ns_step_op
from .rowwise import ROWWISE_NORMS, rowwise_step_, rowwise_step_op
from .tables import view_strides, writable

__all__ = ["fused_norm", "fused_step_", "spectral_step_"]

_NS_DTYPES = (torch.bfloat16, torch.float16)

#: The native (``backend="cuda"``) steps, as ops ``scion_kernels::native_ns_step_`` (one call per
#: Newton–Schulz bucket) and ``scion_kernels::native_rowwise_step_`` (one per row-wise launch).
native_ns_step_op = step_op("native_ns_step_", _native.ns_step_)
native_rowwise_step_op = step_op("native_rowwise_step_", _native.rowwise_step_)


def fused_norm(norm: Norm, shape: Sequence[int]) -> Norm | None:
    """The norm the kernels (Triton or native: the same set) run for a parameter of ``shape``
    (``Auto`` resolved), or ``None``."""
    norm = norm.pick(shape)
    if isinstance(norm, Spectral):
        ok = norm.polar == "newton_schulz" and norm.ns_dtype in _NS_DTYPES
        return norm if ok else None
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
    native = backend == "cuda"
    ns_op = native_ns_step_op if native else ns_step_op
    row_op = native_rowwise_step_op if native else rowwise_step_op
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
    op: Any = ns_step_op,
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
        shape = norm._matrix_shape(p.shape)
        tensors = (p, g) if d is None else (p, g, d)
        views = all(view_strides(t.shape, t.stride(), shape) is not None for t in tensors)
        if not views or not all(writable(t) for t in tensors if t is not g):
            left.append(i)
            continue
        r, c = shape[1:]
        key = (
            p.device, min(r, c), max(r, c), norm.ns_dtype, norm._table,
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
