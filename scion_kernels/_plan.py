"""Planning for the fused backends: which parameters of a group their kernels take, and one op
call per bucket.

A Spectral-family parameter (``Spectral``, ``SpectralConv``, or what ``Auto`` picks for it) with
Newton–Schulz in bf16 or fp16 (``ns_dtype=None`` is bf16 here: the kernels run on GPUs) is taken
when its matrices are a reshape of it (not ``split`` blocks, not a transposed conv's) and its
parameter, gradient and buffer can all be seen as them without a copy; Sign, ColNorm, RowNorm and
BiasRMS parameters (their :meth:`~scion_kernels.norms.Norm.groups`) when the three share one such
layout. Everything else stays on the reference path. Taken Spectral parameters are bucketed by
oriented shape, dtypes and coefficient set, one ``scion_kernels::ns_step_`` op call per bucket;
the grouped ones go by kind and dtypes, one ``scion_kernels::rowwise_step_`` call each
(:mod:`scion_kernels._ops`; the backend is an argument of the op).

The same plan serves every fused backend, and this module imports none of them. It looks only
at shapes, strides, dtypes and norms (never at data or addresses), so ``torch.compile
(fullgraph=True)`` traces it into those op calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _ops
from ._tables import flatten, view_strides, writable
from .norms import Norm, Spectral

__all__ = ["Update", "fused_norm", "fused_step_", "kernel_dtype"]

_NS_DTYPES = (torch.bfloat16, torch.float16)


class Update(NamedTuple):
    """The step's scalars: ``d ← (1 − α)·d + α·g``, then ``x ← (1 − γ)·x − γ·ρ·u``
    (``constrained``) or ``x ← x − γ·ρ·u``."""

    alpha: float
    lr: float
    scale: float
    constrained: bool

    @property
    def decay(self) -> float:
        """The factor of ``x``: ``1 − γ`` (constrained) or 1."""
        return 1.0 - self.lr if self.constrained else 1.0

    @property
    def coef(self) -> float:
        """The factor of ``u``: ``−γ·ρ``."""
        return -self.lr * self.scale


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
    return norm if norm.groups(shape) is not None else None


def fused_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Norm],
    backend: str,
    update: Update,
) -> list[int]:
    """The Scion step with ``update``'s scalars on every parameter ``backend``'s kernels take
    (``norms`` from :func:`fused_norm`); returns the indices of the others."""
    left: list[int] = []
    for spectral, step in ((True, _spectral_step_), (False, _grouped_step_)):
        idx = [i for i, n in enumerate(norms) if isinstance(n, Spectral) == spectral]
        if not idx:
            continue
        batch = _Batch(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            None if bufs is None else [bufs[i] for i in idx],
            [norms[i] for i in idx],
        )
        left.extend(idx[j] for j in step(batch, backend, update))
    return sorted(left)


class _Batch(NamedTuple):
    """Parameters of one kind (Spectral or grouped), their gradients, buffers and norms."""

    params: list[Tensor]
    grads: list[Tensor]
    bufs: list[Tensor] | None
    norms: list[Any]


def _spectral_step_(batch: _Batch, backend: str, update: Update) -> list[int]:
    """The whole Scion step for the parameters the kernels can take; returns the others.

    For each taken parameter ``x`` (gradient ``g``, buffer ``d`` or none when ``bufs`` is
    ``None``)::

        d ← (1 − α)·d + α·g;   x ← (1 − γ)·x − γ·ρ·s·polar(d)   (or x ← x − γ·ρ·s·polar(d))

    One ``scion_kernels::ns_step_`` call per bucket. Returns the indices of the parameters left
    for the reference path.
    """
    params, grads, bufs, norms = batch
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

    for key, members in buckets.items():
        _, m, n, ns_dtype, table = key[:5]
        idx = [i for i, _ in members]
        _ops.ns_step_(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [] if bufs is None else [bufs[i] for i in idx],
            [tall for _, tall in members],
            [norms[i].scale_for(params[i].shape) for i in idx],
            m,
            n,
            ns_dtype,
            flatten(table),
            update.alpha,
            update.coef,
            update.decay,
            backend=backend,
        )
    return left


def _grouped_step_(batch: _Batch, backend: str, update: Update) -> list[int]:
    """The whole step for Sign/ColNorm/RowNorm/BiasRMS parameters; returns the ones left.

    ``x ← (1 − γ)·x − γ·ρ·lmo(d)`` (or ``x ← x − γ·ρ·lmo(d)``) after ``d ← (1 − α)·d + α·g``
    (``bufs`` ``None``: ``d = g``), one ``scion_kernels::rowwise_step_`` call per kind and dtype
    combination. A parameter whose ``x``, ``g`` and ``d`` cannot all be seen as the same
    strided matrices without a copy is left for the reference path.
    """
    params, grads, bufs, norms = batch
    left: list[int] = []
    launches: dict[tuple, list[tuple[int, int, int, bool, float, float]]] = {}
    for i, (p, g, norm) in enumerate(zip(params, grads, norms, strict=True)):
        d = g if bufs is None else bufs[i]
        spec = norm.groups(p.shape)
        assert spec is not None
        shape = spec.matrices
        strides = view_strides(p.shape, p.stride(), shape)
        same = all(
            t.stride() == p.stride() or view_strides(t.shape, t.stride(), shape) == strides
            for t in (g, d)
        )
        if strides is None or not same or not writable(p):  # same strides: d is writable too
            left.append(i)
            continue
        key = (p.device, spec.sign, spec.whole, p.dtype, g.dtype, d.dtype)
        launches.setdefault(key, []).append((i, *shape[1:], spec.columns, spec.q, spec.eps))

    for (_, sign, whole, *_), members in launches.items():
        idx = [member[0] for member in members]
        _ops.rowwise_step_(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [] if bufs is None else [bufs[i] for i in idx],
            [v for member in members for v in member[1:3]],
            [member[3] for member in members],
            [member[4] for member in members],
            [member[5] for member in members],
            sign,
            whole,
            update.alpha,
            update.coef,
            update.decay,
            backend=backend,
        )
    return left
