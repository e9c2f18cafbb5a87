"""The plan of a fused step: one op call per bucket of a group's parameters, the same for every
fused backend.

The route (:func:`scion_kernels.backends.route`) has already asked the backend which parameters
it takes (:meth:`~.base.Backend.refusal`: norm, dtypes, steps, layout). Here, at step time, a
taken parameter whose parameter, gradient and buffer cannot all be seen as its matrices without
a copy (a transposed view, a non-contiguous gradient), or whose gradient has a dtype the kernels
do not take, is left for the reference path. Taken Spectral parameters are bucketed by oriented
shape, dtypes and coefficient set, one ``scion_kernels::ns_step_`` call per bucket; the grouped
ones (Sign, ColNorm, RowNorm, BiasRMS: their :meth:`~scion_kernels.norms.Norm.group_spec`) by
kind and dtypes, one ``scion_kernels::grouped_step_`` call each (:mod:`.ops`).

It looks only at shapes, strides, dtypes and norms (never at data or addresses), so
``torch.compile(fullgraph=True)`` traces it into those op calls; a tensor ``lr`` or
``momentum`` goes to them as a tensor, read by the kernels on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..newton_schulz import orient
from ..norms import Norm, Spectral
from . import ops
from .tables import flatten, view_strides, writable

if TYPE_CHECKING:
    from .base import Backend, Update

__all__ = ["fused_step_"]


def fused_step_(
    backend: Backend,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Norm],
    update: Update,
) -> list[int]:
    """The Scion step with ``update``'s scalars on every parameter ``backend``'s kernels take
    at these strides (``norms``: each one's picked norm); returns the indices of the others."""
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


def _spectral_step_(batch: _Batch, backend: Backend, update: Update) -> list[int]:
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
        typed = all(t.dtype in backend.capabilities.tensor_dtypes for t in tensors)
        if not views or not typed or not all(writable(t) for t in tensors if t is not g):
            left.append(i)
            continue
        m, n, tall = orient(*shape[1:])
        key = (
            p.device, m, n, backend.compute_dtype(norm, p.device), norm.table,
            norm.polar == "gram", p.dtype, g.dtype, None if d is None else d.dtype,
        )  # fmt: skip
        buckets.setdefault(key, []).append((i, tall))

    for key, members in buckets.items():
        _, m, n, ns_dtype, table, gram = key[:6]
        idx = [i for i, _ in members]
        ops.ns_step_(
            backend,
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [] if bufs is None else [bufs[i] for i in idx],
            [tall for _, tall in members],
            [norms[i].scale_for(params[i].shape) for i in idx],
            m,
            n,
            ns_dtype,
            flatten(table),
            gram,
            update.number_alpha,
            _on_device(update.device_alpha, key[0]),
            _on_device(update.device_lr, key[0]),
            update.coef,
            update.decay,
        )
    return left


def _grouped_step_(batch: _Batch, backend: Backend, update: Update) -> list[int]:
    """The whole step for Sign/ColNorm/RowNorm/BiasRMS parameters; returns the ones left.

    ``x ← (1 − γ)·x − γ·ρ·lmo(d)`` (or ``x ← x − γ·ρ·lmo(d)``) after ``d ← (1 − α)·d + α·g``
    (``bufs`` ``None``: ``d = g``), one ``scion_kernels::grouped_step_`` call per kind and dtype
    combination. A parameter whose ``x``, ``g`` and ``d`` cannot all be seen as the same
    strided matrices without a copy is left for the reference path.
    """
    params, grads, bufs, norms = batch
    left: list[int] = []
    launches: dict[tuple, list[tuple[int, int, int, bool, float, float]]] = {}
    for i, (p, g, norm) in enumerate(zip(params, grads, norms, strict=True)):
        d = g if bufs is None else bufs[i]
        spec = norm.group_spec(p.shape)
        assert spec is not None
        shape = spec.matrices
        strides = view_strides(p.shape, p.stride(), shape)
        same = all(
            t.stride() == p.stride() or view_strides(t.shape, t.stride(), shape) == strides
            for t in (g, d)
        )
        typed = all(t.dtype in backend.capabilities.tensor_dtypes for t in (p, g, d))
        # Same strides as p: d is writable too.
        if strides is None or not same or not typed or not writable(p):
            left.append(i)
            continue
        key = (p.device, spec.sign, spec.whole, p.dtype, g.dtype, d.dtype)
        launches.setdefault(key, []).append((i, *shape[1:], spec.columns, spec.q, spec.eps))

    for (device, sign, whole, *_), members in launches.items():
        idx = [member[0] for member in members]
        ops.grouped_step_(
            backend,
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [] if bufs is None else [bufs[i] for i in idx],
            [v for member in members for v in member[1:3]],
            [member[3] for member in members],
            [member[4] for member in members],
            [member[5] for member in members],
            sign,
            whole,
            update.number_alpha,
            _on_device(update.device_alpha, device),
            _on_device(update.device_lr, device),
            update.coef,
            update.decay,
        )
    return left


def _on_device(option: Tensor | None, device: torch.device) -> Tensor | None:
    """A tensor option (``lr``, ``momentum``) as the kernels read it: one float32 element on
    ``device`` (the tensor itself when it is one already; a copy otherwise, e.g. a CPU tensor
    for CUDA parameters, where the step is not capturable anyway)."""
    if option is None:
        return None
    return option.reshape(1).to(device=device, dtype=torch.float32)
