"""Sign, ColNorm, RowNorm and BiasRMS: averaging, LMO and update in one multi-tensor launch.

Every one of these LMOs acts on independent *groups* of elements — rows (RowNorm, Sign),
columns (ColNorm: rows of the transposed strides), or the whole tensor (BiasRMS) — and the
three ℓ2 ones share one form::

    u = v / (‖v‖₂·q + ε)    RowNorm q = √d_in (or 1);  ColNorm q = d_in/√d_out (or 1/√d_out);
                            BiasRMS q = 1/√numel
    u = sign(v)·f           Sign, f = 1/d_in (or 1)

A program owns a strip of ``BLOCK_R`` groups of one tensor and walks them twice: the first pass
averages ``d ← (1 − α)·d + α·g`` (stored) and sums ``d²`` per group, the second reads ``d`` back
and applies ``x ← decay·x + coef·u`` in the parameter's dtype (Sign needs one pass), with
``coef`` and ``decay`` as given or formed from a device ``lr`` (:mod:`.ops`). Tensors are
described by table rows (addresses, group count and length, strides), so all tensors of a
parameter group with the same dtypes and kind go in one launch. Which tensors go in which
launch is planned in :mod:`scion_kernels.backends.plan`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import GroupedStep
from ..tables import cached, cdiv, device_table, group_rows
from . import Policy, interpreting, on_device
from .newton_schulz import _average_factors, _round, _update_factors

__all__ = ["grouped_step_"]


@triton.jit
def _grouped_kernel(
    strips,  # int64 (S, 2): tensor index, first group of the strip
    ints,  # int64 (T, 7): p, g, d addresses, groups, group length, group stride, elem stride
    floats,  # float32 (T, 2): q (or f for Sign), ε
    p_like,
    g_like,
    d_like,
    momentum,  # (1,) float32: α, read only if ALPHA_TENSOR
    lr,  # (1,) float32: γ, read only if LR_TENSOR
    alpha,
    beta,
    coef,
    decay,
    HAS_BUF: tl.constexpr,
    SIGN: tl.constexpr,
    ALPHA_TENSOR: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One strip: ``d ← β·d + α·g``, ``u`` per group, ``x ← decay·x + coef·u`` (with
    ``LR_TENSOR``: ``x ← (1 − decay·γ)·x + coef·γ·u``)."""
    s = tl.program_id(0).to(tl.int64)
    coef, decay = _update_factors(lr, coef, decay, LR_TENSOR)
    alpha, beta = _average_factors(momentum, alpha, beta, ALPHA_TENSOR)
    t = tl.load(strips + 2 * s)
    row = ints + t * 7
    p_ptr = tl.load(row).to(p_like.dtype)
    g_ptr = tl.load(row + 1).to(g_like.dtype)
    d_ptr = tl.load(row + 2).to(d_like.dtype)
    groups, length = tl.load(row + 3), tl.load(row + 4)
    group_stride, elem_stride = tl.load(row + 5), tl.load(row + 6)
    q, eps = tl.load(floats + t * 2), tl.load(floats + t * 2 + 1)

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
        inv = tl.div_rn(1.0, tl.sqrt_rn(ssq) * q + eps)
        src = d_ptr if HAS_BUF else g_ptr
        for l0 in range(0, length, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            mask = row_ok & (cols[None, :] < length)
            off = base + cols[None, :] * elem_stride
            u = tl.load(src + off, mask=mask, other=0.0).to(tl.float32) * inv[:, None]
            x = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32) * decay + coef * u
            tl.store(p_ptr + off, _round(x, p_like.dtype.element_ty, EMULATE_RNE), mask=mask)


def grouped_step_(policy: Policy, *args: Any) -> None:
    """``scion_kernels::grouped_step_`` with the Triton kernel (arguments after ``policy``:
    :class:`~scion_kernels.backends.ops.GroupedStep`): Sign or ℓ2 groups of many tensors in
    one launch; BiasRMS tensors (``whole``) are read in long strips."""
    a = GroupedStep(*args)
    params, grads, bufs, q, eps, sign = a.params, a.grads, a.bufs, a.q, a.eps, a.sign
    if not params:
        return
    device = params[0].device
    block_r = 1 if a.whole else policy.grouped_rows[0 if sign else 1]
    ints, floats, strips = [], [], []
    for i, row in group_rows(params, grads, bufs, a.shapes, a.columns):
        ints.append(row)
        floats.append((q[i], eps[i]))
        strips.append(cdiv(row[3], block_r))
    if not ints:
        return
    interpret = interpreting()
    with on_device(device):  # Triton launches on the current device
        _grouped_kernel[(sum(strips),)](
            _strip_table(strips, block_r, device),
            device_table(ints, torch.int64, device),
            device_table(floats, torch.float32, device),
            params[0],
            grads[0],
            bufs[0] if bufs else grads[0],
            params[0] if a.momentum is None else a.momentum,
            params[0] if a.lr is None else a.lr,
            float(a.alpha),
            1.0 - float(a.alpha),
            float(a.coef),
            float(a.decay),
            HAS_BUF=bool(bufs),
            SIGN=sign,
            ALPHA_TENSOR=a.momentum is not None,
            LR_TENSOR=a.lr is not None,
            EMULATE_RNE=interpret,
            BLOCK_R=block_r,
            BLOCK_L=policy.grouped_chunk[1 if a.whole else 0],
            num_warps=4,
        )


def _strip_table(strips: list[int], block_r: int, device: torch.device) -> Tensor:
    """Rows ``(tensor index, first group)`` of every strip, ``strips[t]`` strips for tensor t."""

    def build() -> Tensor:
        counts = torch.tensor(strips, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(strips)), counts)
        start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        first = torch.arange(len(owner)) - start  # strip index within its tensor
        return torch.stack([owner, first * block_r], dim=1)

    return cached(("strips", device, block_r, tuple(strips)), build, device)
