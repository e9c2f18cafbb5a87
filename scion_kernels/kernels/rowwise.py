"""Sign, ColNorm, RowNorm and BiasRMS: averaging, LMO and update in one multi-tensor launch.

Every one of these LMOs acts on independent *groups* of elements — rows (RowNorm, Sign),
columns (ColNorm: rows of the transposed strides), or the whole tensor (BiasRMS) — and the
three ℓ2 ones share one form::

    u = v / (‖v‖₂·q + ε)    RowNorm q = √d_in (or 1);  ColNorm q = d_in/√d_out (or 1/√d_out);
                            BiasRMS q = 1/√numel
    u = sign(v)·f           Sign, f = 1/d_in (or 1)

A program owns a strip of ``BLOCK_R`` groups of one tensor and walks them twice: the first pass
averages ``d ← (1 − α)·d + α·g`` (stored) and sums ``d²`` per group, the second reads ``d`` back
and applies ``x ← decay·x + coef·u`` in the parameter's dtype (Sign needs one pass). Tensors are
described by table rows (addresses, group count and length, strides), so all tensors of a
parameter group with the same dtypes and kind go in one launch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..norms import BiasRMS, ColNorm, Norm, RowNorm, Sign
from . import interpreting
from .newton_schulz import _round, matrix_view

__all__ = ["ROWWISE_NORMS", "rowwise_step_"]

ROWWISE_NORMS = (Sign, ColNorm, RowNorm, BiasRMS)  # RowNorm subclasses ColNorm
_INTS, _FLOATS = 7, 3  # table row widths


@triton.jit
def _rowwise_kernel(
    strips,  # int64 (S, 2): tensor index, first group of the strip
    ints,  # int64 (T, 7): p, g, d addresses, groups, group length, group stride, elem stride
    floats,  # float32 (T, 3): q (or f for Sign), coef, ε
    p_like,
    g_like,
    d_like,
    alpha,
    beta,
    decay,
    HAS_BUF: tl.constexpr,
    SIGN: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One strip: ``d ← β·d + α·g``, ``u`` per group, ``x ← decay·x + coef·u``."""
    s = tl.program_id(0).to(tl.int64)
    t = tl.load(strips + 2 * s)
    row = ints + t * 7
    p_ptr = tl.load(row).to(p_like.dtype)
    g_ptr = tl.load(row + 1).to(g_like.dtype)
    d_ptr = tl.load(row + 2).to(d_like.dtype)
    groups, length = tl.load(row + 3), tl.load(row + 4)
    group_stride, elem_stride = tl.load(row + 5), tl.load(row + 6)
    q, coef, eps = tl.load(floats + t * 3), tl.load(floats + t * 3 + 1), tl.load(floats + t * 3 + 2)

    rows = tl.load(strips + 2 * s + 1) + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows[:, None] < groups
    base = rows[:, None] * group_stride
    ssq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for l0 in range(0, length, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        mask = row_ok & (cols[None, :] < length)
        off = base + cols[None, :] * elem_stride
        d = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_BUF:
            buf = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32)
            stored = _round(buf * beta + alpha * d, d_like.dtype.element_ty, EMULATE_RNE)
            tl.store(d_ptr + off, stored, mask=mask)
            d = stored.to(tl.float32)
        if SIGN:
            u = tl.where(d > 0, q, tl.where(d < 0, -q, d))  # keeps 0 and NaN
            x = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32) * decay + coef * u
            tl.store(p_ptr + off, _round(x, p_like.dtype.element_ty, EMULATE_RNE), mask=mask)
        else:
            ssq += tl.sum(d * d, axis=1)
    if not SIGN:
        # Each thread reads back what it stored: the loads below use the stores' layout.
        tl.debug_barrier()
        inv = 1.0 / (tl.sqrt(ssq) * q + eps)
        src = d_ptr if HAS_BUF else g_ptr
        for l0 in range(0, length, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            mask = row_ok & (cols[None, :] < length)
            off = base + cols[None, :] * elem_stride
            u = tl.load(src + off, mask=mask, other=0.0).to(tl.float32) * inv[:, None]
            x = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32) * decay + coef * u
            tl.store(p_ptr + off, _round(x, p_like.dtype.element_ty, EMULATE_RNE), mask=mask)


def _groups(norm: Norm, t: Tensor) -> list[tuple[Tensor, int, int, int, int]] | None:
    """``(base view, groups, length, group stride, elem stride)`` per matrix, or ``None``."""
    if isinstance(norm, BiasRMS):
        if not t.is_contiguous():
            return None
        return [(t, 1, t.numel(), 0, 1)]
    mats = matrix_view(t, norm)
    if mats is None:
        return None
    out = []
    for M in mats.unbind(0):
        r, c = M.shape
        sr, sc = M.stride()
        # ColNorm's groups are columns; `transpose` (ColNorm, RowNorm) swaps rows and columns.
        columns = type(norm) is ColNorm
        if isinstance(norm, ColNorm) and norm.transpose:
            columns = not columns
        out.append((M, c, r, sc, sr) if columns else (M, r, c, sr, sc))
    return out


def _factors(norm: Norm, shape: Sequence[int], groups: int, length: int) -> tuple[float, float]:
    """``(q or f, ε)`` for one matrix whose groups are ``groups`` × ``length``."""
    if isinstance(norm, Sign):
        return (1.0 / shape[-1] if norm.normalized else 1.0), 0.0
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
) -> list[int]:
    """The whole step for Sign/ColNorm/RowNorm/BiasRMS parameters; returns the ones left.

    ``x ← (1 − γ)·x − γ·ρ·lmo(d)`` (or ``x ← x − γ·ρ·lmo(d)``) after ``d ← (1 − α)·d + α·g``
    (``bufs`` ``None``: ``d = g``). A parameter whose tensors cannot be described without a copy
    (non-contiguous BiasRMS tensors, unviewable matrices) is left for the reference path.
    """
    left: list[int] = []
    # Per launch: strips per tensor, the int table rows, the float table rows.
    launches: dict[tuple, tuple[list, list, list]] = {}
    for i, (p, g, norm) in enumerate(zip(params, grads, norms, strict=True)):
        d = g if bufs is None else bufs[i]
        parts = [_groups(norm, t) for t in (p, g, d)]
        if any(x is None for x in parts) or len({tuple(x[1:] for x in pt) for pt in parts}) != 1:
            left.append(i)  # layouts differ between p, g and d: take the reference path
            continue
        sign = isinstance(norm, Sign)
        whole = isinstance(norm, BiasRMS)
        key = (p.device, sign, whole, p.dtype, g.dtype, d.dtype)
        strips, ints, floats = launches.setdefault(key, ([], [], []))
        block_r = _block_r(sign, whole)
        for (pv, groups, length, gs, es), (gv, *_), (dv, *_) in zip(*parts, strict=True):
            q, eps = _factors(norm, p.shape, groups, length)
            coef = -lr * scale
            ints.append((pv.data_ptr(), gv.data_ptr(), dv.data_ptr(), groups, length, gs, es))
            floats.append((q, coef, eps))
            strips.append(triton.cdiv(groups, block_r))

    decay = 1.0 - lr if constrained else 1.0
    interpret = interpreting()
    for key, (strips, ints, floats) in launches.items():
        device, sign, whole = key[:3]
        p_dtype, g_dtype, d_dtype = key[3:]
        like = [torch.empty(0, dtype=dt, device=device) for dt in (p_dtype, g_dtype, d_dtype)]
        block_r = _block_r(sign, whole)
        counts = torch.tensor(strips, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(strips)), counts)
        start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        first = torch.arange(len(owner)) - start  # strip index within its tensor
        _rowwise_kernel[(len(owner),)](
            torch.stack([owner, first * block_r], dim=1).to(device),
            torch.tensor(ints, dtype=torch.int64).to(device),
            torch.tensor(floats, dtype=torch.float32).to(device),
            *like,
            float(alpha),
            1.0 - float(alpha),
            decay,
            HAS_BUF=bufs is not None,
            SIGN=sign,
            EMULATE_RNE=interpret,
            BLOCK_R=block_r,
            BLOCK_L=32 if interpret else (1024 if whole else 256),
            num_warps=4,
        )
    return left


def _block_r(sign: bool, whole: bool) -> int:
    if whole:
        return 1
    return 4 if interpreting() else (8 if sign else 4)
