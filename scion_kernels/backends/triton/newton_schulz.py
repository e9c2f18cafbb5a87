"""Triton Newton–Schulz for a bucket of same-shape matrices, with the Scion update fused in.

One bucket is ``B`` matrices that share their oriented shape ``m×n`` (``m ≤ n``; a tall matrix
is read and written through transposed strides, never copied). Per step of the bucket::

    prologue    d ← (1 − α)·d + α·g;  per tile: max|d| and Σ(d/max|d|)²
    scales      max|d| and ‖d/max|d|‖_F per matrix from the tile pairs, in a fixed order
    normalize   X₀ ← (d/max|d|)/‖d/max|d|‖_F, rounded once to the compute dtype
    for (a, b, c) in coefficients:
        syrk    A ← X·Xᵀ          (lower-triangle tiles only, each stored twice)
        syrk    B ← b·A + c·A·A   (A is symmetric, so A·A = A·Aᵀ: the same kernel)
        apply   X ← a·X + B·X     (last step: x ← (1 − γ)·x − γ·ρ·s·X into the parameter)

With ``gram`` (``polar="gram"``) a wide enough bucket runs the Gram form instead
(:func:`~scion_kernels.newton_schulz.gram_iterate`): ``R ← X·Xᵀ`` once, then per step only
m×m products, every one on lower-triangle tiles through the same syrk kernel
(``P ← a·I + b·R + c·R²``, ``Q ← Q·P``, ``R ← P·(R·P)``), and ``X ← Q·X`` through the apply
kernel at each restart and at the end (the last one with the update).

On Hopper the policy adds persistent candidates of both products that read through TMA
descriptors (``_syrk_tma_kernel``, ``_apply_tma_kernel``), chosen only by autotuning.

Dividing by the largest entry before the norm keeps every intermediate within float32 for any
finite gradient, so 1e-40 and 1e38 gradients are orthogonalized like unit ones, in bf16 and in
fp16; a zero matrix gives a zero update; NaN and inf stay non-finite. Work matrices have their
rows padded with zeros to a multiple of 16 elements (aligned, vectorizable rows). All grids
are one-dimensional, the matrix index folded into the program index.

Small buckets (a padded matrix of at most the policy's ``small_limit`` elements and
``small_rows`` rows, :class:`~scion_kernels.backends.triton.Policy`) run
all of this in one program per matrix instead (``_small_kernel``), every intermediate in
registers, one launch for the whole bucket, with the same rounding points.

Matrices are addressed through tables of ``(address, row stride, column stride)`` rows
(int64, in elements), one per matrix, so a bucket gathers parameters from anywhere in memory
with one launch per stage; offsets are computed in int64. The tables are kept on the device
between steps (:mod:`scion_kernels.backends.tables`).

The host code runs two of the package's ops for the backend object
(:mod:`scion_kernels.backends.ops`), so ``torch.compile`` sees one opaque call per bucket:
``scion_kernels::ns_step_`` (the whole Scion step of a bucket, in place) and
``scion_kernels::polar`` (the orthogonalization alone).

The kernels are checked on CPU with Triton's interpreter, which rounds float32 → bfloat16 by
truncation and does no bf16 arithmetic: when interpreting, operands are cast to float32 before
``tl.dot`` and bf16 stores round to nearest-even explicitly (``_round``), so the interpreted
kernels compute the function the compiled ones do. Not the same bits: compiled, the products
accumulate in the tensor cores' order, element-wise arithmetic may contract into FMAs, and the
code is built assuming no NaNs. So the per-matrix normalizations use round-to-nearest division
and square root (``div_rn``, ``sqrt_rn``), a non-finite value is told by its exponent bits
(``_finite``) rather than by ``x == x``, and the tests compare every backend with the reference
under the tolerance rules of ``tests/test_backends.py``, never bit for bit across backends or
between the interpreter and a GPU (only a backend against itself: the same inputs give the
same bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...newton_schulz import gram_restart_every, orient, uses_gram
from .. import ops, registry
from ..base import HALF
from ..ops import NSStep
from ..tables import (
    bucket_rows,
    cdiv,
    device_table,
    flatten,
    matrix_rows,
    next_power_of_2,
    triples,
)
from . import Policy, on_device
from .tuning import NSBucket, autotuning, config, tuned

__all__ = ["NSBucket", "newton_schulz_bucket", "ns_step_", "polar", "polar_"]

Triple = tuple[float, float, float]

# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """``x`` (float32) rounded to ``dtype``; round-to-nearest-even also in the interpreter."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _finite(x):
    """Whether float32 ``x`` is finite, read off its exponent bits: the compiled kernels are
    built assuming no NaNs, under which ``x == x`` may be folded to true."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def _operand(x, CAST_F32: tl.constexpr):
    """A ``tl.dot`` operand: as loaded on a GPU, in float32 in the interpreter."""
    if CAST_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_origin(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Matrix index, first row and first column (int64) of this program's output tile.

    The grid is one-dimensional (the second axis is limited to 65535): programs run through
    the tiles of matrix 0 row-major, then those of matrix 1, and so on.
    """
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    t = pid % tiles
    return pid // tiles, (t // tiles_n) * BLOCK_M, (t % tiles_n) * BLOCK_N


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Matrix index (int64) and row/column indices (int64) of this program's output tile."""
    b, row0, col0 = _tile_origin(M, N, BLOCK_M, BLOCK_N)
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = col0 + tl.arange(0, BLOCK_N).to(tl.int64)
    return b, rows, cols


@triton.jit
def _average(
    table, b, rows, cols, mask, g_like, d_like, alpha, beta,
    HAS_BUF: tl.constexpr, EMULATE_RNE: tl.constexpr,
):  # fmt: skip
    """``d ← β·d + α·g`` (stored) on a tile of matrix ``b`` (``table`` rows: g address and
    strides, d address and strides); returns ``d`` (``g`` without a buffer) in float32."""
    entry = table + b * 6
    g_ptr = tl.load(entry).to(g_like.dtype)
    g_off = rows * tl.load(entry + 1) + cols * tl.load(entry + 2)
    d = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BUF:
        d_ptr = tl.load(entry + 3).to(d_like.dtype)
        d_off = rows * tl.load(entry + 4) + cols * tl.load(entry + 5)
        buf = tl.load(d_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        stored = _round(buf * beta + alpha * d, d_like.dtype.element_ty, EMULATE_RNE)
        tl.store(d_ptr + d_off, stored, mask=mask)
        d = stored.to(tl.float32)
    return d


@triton.jit
def _update(
    ptable, b, rows, cols, mask, p_like, factors, x, coef, decay, EMULATE_RNE: tl.constexpr
):
    """``w ← decay·w + coef·f_b·x`` on a tile of parameter matrix ``b``, in its dtype."""
    entry = ptable + b * 3
    w_ptr = tl.load(entry).to(p_like.dtype)
    w_off = rows * tl.load(entry + 1) + cols * tl.load(entry + 2)
    w = tl.load(w_ptr + w_off, mask=mask, other=0.0).to(tl.float32)
    w = w * decay + (coef * tl.load(factors + b)) * x.to(tl.float32)
    tl.store(w_ptr + w_off, _round(w, p_like.dtype.element_ty, EMULATE_RNE), mask=mask)


@triton.jit
def _update_tile(
    out_b, table, b, row0, c64, M, N, LDX, p_like, factors, lr, coef, decay,
    LR_TENSOR: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK_M: tl.constexpr,
    UPDATE_ROWS: tl.constexpr,
):  # fmt: skip
    """The parameter update of an output tile at rows ``row0…`` and columns ``c64`` of matrix
    ``b``, read back from the output ``out_b`` (rows of ``LDX``) in slices of ``UPDATE_ROWS``:
    the parameter's strides are only known at run time, so each element needs its own address,
    which for a whole tile at once exceeds the register file. The caller has stored the tile
    and passed a barrier."""
    coef, decay = _update_factors(lr, coef, decay, LR_TENSOR)
    for r in tl.static_range(0, BLOCK_M, UPDATE_ROWS):
        r64 = (row0 + r + tl.arange(0, UPDATE_ROWS)).to(tl.int64)[:, None]
        mask = (r64 < M) & (c64 < N)
        piece = tl.load(out_b + r64 * LDX + c64, mask=mask, other=0.0)
        _update(table, b, r64, c64, mask, p_like, factors, piece, coef, decay, EMULATE_RNE)


@triton.jit
def _average_factors(momentum, alpha, beta, ALPHA_TENSOR: tl.constexpr):
    """The averaging's ``(α, β)``: as given, or with ``ALPHA_TENSOR`` α read from the device
    (``momentum``, one float32 element) and ``β = 1 − α``."""
    if ALPHA_TENSOR:
        alpha = tl.load(momentum)
        beta = 1.0 - alpha
    return alpha, beta


@triton.jit
def _update_factors(lr, coef, decay, LR_TENSOR: tl.constexpr):
    """The update's ``(coef, decay)``: as given, or with ``LR_TENSOR`` per unit of the device
    ``lr`` γ (one float32 element): ``(coef·γ, 1 − decay·γ)``."""
    if LR_TENSOR:
        gamma = tl.load(lr)
        coef = coef * gamma
        decay = 1.0 - decay * gamma
    return coef, decay


@triton.jit
def _prologue_kernel(
    table,  # int64 (B, 6): g address, g row stride, g col stride, d address, d strides
    g_like,  # any tensor of the gradients' dtype (only its pointer type is used)
    d_like,  # any tensor of the buffers' dtype
    partials,  # (B, tiles, 2) float32: max |d| and Σ (d / max|d|)² per tile
    momentum,  # (1,) float32: α, read only if ALPHA_TENSOR
    M,
    N,
    alpha,
    beta,
    HAS_BUF: tl.constexpr,
    ALPHA_TENSOR: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``d ← β·d + α·g`` (β = 1 − α), stored; per tile ``max|d|`` and ``Σ(d/max|d|)²``."""
    b, rows, cols = _tile(M, N, BLOCK_M, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    alpha, beta = _average_factors(momentum, alpha, beta, ALPHA_TENSOR)
    d = _average(
        table, b, rows[:, None], cols[None, :], mask, g_like, d_like, alpha, beta,
        HAS_BUF, EMULATE_RNE,
    )  # fmt: skip

    # A scaled sum of squares (as LAPACK's nrm2): no overflow for |d| up to the float32 max.
    amax = tl.max(tl.max(tl.abs(d), axis=1), axis=0)
    safe = tl.where(amax > 0, amax, 1.0)
    ratio = tl.div_rn(d, safe)
    ssq = tl.sum(tl.sum(ratio * ratio, axis=1), axis=0)
    out = partials + tl.program_id(0).to(tl.int64) * 2
    tl.store(out, amax)
    tl.store(out + 1, ssq)


@triton.jit
def _scales_kernel(
    partials,  # (B, TILES, 2) float32 from the prologue
    scales,  # (B, 2) float32 output: max|d| and ‖d / max|d|‖_F (1 where they are 0)
    TILES,
    BLOCK: tl.constexpr,
):
    """One matrix per program: combine the prologue's tile pairs in a fixed order (the same
    bits on every run). NaN and inf pass through to the scales."""
    b = tl.program_id(0).to(tl.int64)
    base = partials + b * TILES * 2
    lanes = tl.arange(0, BLOCK)
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(0, TILES, BLOCK):
        t = t0 + lanes
        top = tl.maximum(top, tl.load(base + t * 2, mask=t < TILES, other=0.0))
    top = tl.max(top, axis=0)
    safe = tl.where(top > 0, top, 1.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(0, TILES, BLOCK):
        t = t0 + lanes
        ratio = tl.div_rn(tl.load(base + t * 2, mask=t < TILES, other=0.0), safe)
        acc += ratio * ratio * tl.load(base + t * 2 + 1, mask=t < TILES, other=0.0)
    rest = tl.sqrt_rn(tl.sum(acc, axis=0))
    tl.store(scales + b * 2, tl.where(top == 0, 1.0, top))
    tl.store(scales + b * 2 + 1, tl.where(rest == 0, 1.0, rest))


@triton.jit
def _normalize_kernel(
    table,  # int64 (B, 6): as the prologue's; columns 3–5 address d (g's when no buffer)
    d_like,  # any tensor of d's dtype
    x0,  # (B, M, LDX) output in the compute dtype, rows padded to LDX
    scales,  # (B, 2) float32: max|d| and ‖d / max|d|‖_F per matrix (1 where they are 0)
    M,
    N,
    LDX,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``X₀ ← (d / max|d|) / ‖d / max|d|‖_F``, rounded once to the compute dtype.

    Dividing by the largest entry first keeps every intermediate within float32 for any
    finite ``d`` (1e-40 or 3e38 entries alike); a zero matrix gives a zero ``X₀``. The row
    padding is stored as zeros: the products read whole padded rows.
    """
    b, rows, cols = _tile(M, N, BLOCK_M, BLOCK_N)
    r64, c64 = rows[:, None], cols[None, :]
    mask = (r64 < M) & (c64 < N)
    entry = table + b * 6
    d_ptr = tl.load(entry + 3).to(d_like.dtype)
    d_off = r64 * tl.load(entry + 4) + c64 * tl.load(entry + 5)
    d = tl.load(d_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
    x = tl.div_rn(tl.div_rn(d, tl.load(scales + b * 2)), tl.load(scales + b * 2 + 1))
    x_off = b * M * LDX + r64 * LDX + c64
    tl.store(x0 + x_off, _round(x, x0.dtype.element_ty, EMULATE_RNE), mask=(r64 < M) & (c64 < LDX))


@triton.jit
def _lower_tile(t):
    """The ``t``-th tile ``(i, j)``, ``j ≤ i``, of a lower triangle enumerated row by row."""
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # Float rounding can put i one off near a row boundary; fix it exactly in integers.
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    return i, t - i * (i + 1) // 2


@triton.jit
def _syrk_epilogue(
    acc, rows, cols, diagonal, gamma, HAS_DIAG: tl.constexpr, dtype: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):  # fmt: skip
    """A tile of a symmetric product at ``rows × cols``: ``acc`` (+ ``γ`` on the diagonal with
    ``HAS_DIAG``) rounded to ``dtype``. A ``diagonal`` tile computes both of its triangles; it
    keeps the lower one's, so the result is exactly symmetric also where the product is so
    only in exact arithmetic (the Gram form's, whose transposes the next products read)."""
    if HAS_DIAG:
        acc += tl.where(rows[:, None] == cols[None, :], gamma, 0.0)
    out = _round(acc, dtype, EMULATE_RNE)
    if diagonal:
        out = tl.where(rows[:, None] >= cols[None, :], out, tl.trans(out))
    return out


@triton.jit
def _syrk_kernel(
    y,  # (B, M, LDY): M×K matrices, rows padded to LDY
    z,  # (B, M, LDY): M×K matrices (the right operand's rows; y itself for Y·Yᵀ)
    d,  # (B, M, LDC): M×M, symmetric (read only if HAS_D)
    c,  # (B, M, LDC): M×M output
    M,
    K,
    LDY,
    LDC,
    alpha,
    beta,
    gamma,
    HAS_D: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    CAST_F32: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``C ← α·(Y·Zᵀ) + β·D + γ·I`` on the lower-triangle tiles; each tile also stored
    mirrored. ``Z = Y`` (``X·Xᵀ``, ``b·A + c·A·A``) or, in the Gram form, a product that is
    symmetric in exact arithmetic (two polynomials of one symmetric matrix), whose rounding
    the mirror makes symmetric."""
    pid = tl.program_id(0).to(tl.int64)
    tri = tl.cdiv(M, BLOCK)
    tiles = tri * (tri + 1) // 2
    b = pid // tiles
    i, j = _lower_tile((pid % tiles).to(tl.int32))
    rows_i = i * BLOCK + tl.arange(0, BLOCK)
    rows_j = j * BLOCK + tl.arange(0, BLOCK)
    ri, rj = rows_i.to(tl.int64), rows_j.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    y_b = y + b * M * LDY
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + ks).to(tl.int64)
        # Up to the padded row length (zeros past K): a mask bound that is a multiple of 16
        # lets the loads be vectorized and pipelined.
        k_ok = kk[None, :] < LDY
        yi_ptr = y_b + ri[:, None] * LDY + kk[None, :]
        yj_ptr = z + b * M * LDY + rj[:, None] * LDY + kk[None, :]
        yi = tl.load(yi_ptr, mask=(ri[:, None] < M) & k_ok, other=0.0)
        yj = tl.load(yj_ptr, mask=(rj[:, None] < M) & k_ok, other=0.0)
        acc = tl.dot(_operand(yi, CAST_F32), tl.trans(_operand(yj, CAST_F32)), acc)
    acc = acc * alpha
    c_b = c + b * M * LDC
    ij = ri[:, None] * LDC + rj[None, :]
    mask = (ri[:, None] < M) & (rj[None, :] < LDC)  # the padding columns get zeros
    if HAS_D:
        acc += beta * tl.load(d + b * M * LDC + ij, mask=mask, other=0.0).to(tl.float32)
    out = _syrk_epilogue(acc, ri, rj, i == j, gamma, HAS_DIAG, c.dtype.element_ty, EMULATE_RNE)
    tl.store(c_b + ij, out, mask=mask)
    if i != j:
        ji = rj[:, None] * LDC + ri[None, :]
        tl.store(c_b + ji, tl.trans(out), mask=(rj[:, None] < M) & (ri[None, :] < LDC))


@triton.jit
def _apply_kernel(
    p_mat,  # (B, M, LDP): the polynomial B = b·A + c·A·A, M×M
    x,  # (B, M, LDX): M×N, rows padded to LDX
    out,  # (B, M, LDX): M×N output (scratch if UPDATE)
    table,  # int64 (B, 3): parameter address, row stride, col stride (read only if UPDATE)
    p_like,  # any tensor of the parameters' dtype (only its pointer type is used)
    factors,  # (B,) float32: the LMO's factor s per matrix (read only if UPDATE)
    lr,  # (1,) float32: γ, read only if LR_TENSOR
    M,
    N,
    LDP,
    LDX,
    a,
    coef,
    decay,
    UPDATE: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    CAST_F32: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPDATE_ROWS: tl.constexpr,
):
    """``X' ← a·X + B·X``; with ``UPDATE`` also ``x ← decay·x + coef·f_b·bf16(X')`` (with
    ``LR_TENSOR``: ``(1 − decay·γ)·x + coef·γ·f_b·bf16(X')``)."""
    b, rows, cols = _tile(M, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    p_b = p_mat + b * M * LDP
    x_b = x + b * M * LDX
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        kk = (k0 + ks).to(tl.int64)
        # Padded rows are read whole (zeros past M and N), so the mask bounds of the
        # contiguous dimension are multiples of 16 and the loads vectorize and pipeline.
        pt = tl.load(
            p_b + rows[:, None] * LDP + kk[None, :],
            mask=(rows[:, None] < M) & (kk[None, :] < LDP),
            other=0.0,
        )
        xt = tl.load(
            x_b + kk[:, None] * LDX + cols[None, :],
            mask=(kk[:, None] < M) & (cols[None, :] < LDX),
            other=0.0,
        )
        acc = tl.dot(_operand(pt, CAST_F32), _operand(xt, CAST_F32), acc)
    padded = (rows[:, None] < M) & (cols[None, :] < LDX)
    x_tile = tl.load(x_b + rows[:, None] * LDX + cols[None, :], mask=padded, other=0.0)
    acc += a * x_tile.to(tl.float32)
    result = _round(acc, x.dtype.element_ty, EMULATE_RNE)
    out_b = out + b * M * LDX
    tl.store(out_b + rows[:, None] * LDX + cols[None, :], result, mask=padded)
    if UPDATE:
        # The tile goes through the (cache-resident) scratch output and is applied in row
        # slices (_update_tile says why).
        tl.debug_barrier()  # every thread reads back what others stored
        _, row0, _ = _tile_origin(M, N, BLOCK_M, BLOCK_N)
        _update_tile(out_b, table, b, row0, cols[None, :], M, N, LDX, p_like, factors, lr, coef,
                     decay, LR_TENSOR, EMULATE_RNE, BLOCK_M, UPDATE_ROWS)  # fmt: skip


@triton.jit
def _grouped_tile(t, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Tile ``t`` of one matrix's ``tiles_m × tiles_n`` grid in grouped order: ``GROUP_M``
    row tiles walk the columns together, so their right-operand columns stay in L2."""
    in_group = GROUP_M * tiles_n
    first_m = (t // in_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % in_group) % rows, (t % in_group) // rows


@triton.jit
def _syrk_tma_kernel(
    y_desc,  # (B, M, LDY) descriptor, block (1, BLOCK, BLOCK_K): the left operand's rows
    z_desc,  # (B, M, LDY) descriptor, block (1, BLOCK, BLOCK_K): the right operand's rows
    d_desc,  # (B, M, LDC) descriptor, block (1, BLOCK, BLOCK): D (read only if HAS_D)
    c_desc,  # (B, M, LDC) descriptor, block (1, BLOCK, BLOCK): the output
    B,
    M,
    K,
    alpha,
    beta,
    gamma,
    HAS_D: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    CAST_F32: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`_syrk_kernel` for Hopper: persistent (one program per SM walks the lower-triangle
    tiles of the whole bucket), the operands read through TMA descriptors (3-D: rows and
    columns past a matrix read as zeros, stores clipped to it), each tile stored twice through
    the output's descriptor, diagonal tiles made exactly symmetric."""
    tri = tl.cdiv(M, BLOCK)
    per_matrix = tri * (tri + 1) // 2
    # Not flattened (as the apply kernel's loop is): Triton 3.6's nested-loop fusion fails on
    # this body (compile_report for sm_90a), so the epilogue does not overlap the next loads.
    for tile in tl.range(tl.program_id(0), B * per_matrix, tl.num_programs(0)):
        b = tile // per_matrix
        i, j = _lower_tile(tile % per_matrix)
        row0 = i * BLOCK
        col0 = j * BLOCK
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            yi = y_desc.load([b, row0, k0]).reshape(BLOCK, BLOCK_K)
            zj = z_desc.load([b, col0, k0]).reshape(BLOCK, BLOCK_K)
            acc = tl.dot(_operand(yi, CAST_F32), tl.trans(_operand(zj, CAST_F32)), acc)
        acc = acc * alpha
        if HAS_D:
            acc += beta * d_desc.load([b, row0, col0]).reshape(BLOCK, BLOCK).to(tl.float32)
        rows = row0 + tl.arange(0, BLOCK)
        cols = col0 + tl.arange(0, BLOCK)
        out = _syrk_epilogue(acc, rows, cols, i == j, gamma, HAS_DIAG, c_desc.dtype, EMULATE_RNE)
        c_desc.store([b, row0, col0], out.reshape(1, BLOCK, BLOCK))
        if i != j:
            c_desc.store([b, col0, row0], tl.trans(out).reshape(1, BLOCK, BLOCK))


@triton.jit
def _tma_epilogue(
    acc, e_desc, o_desc, out_b, b, row0, col0, M, LDX, a, UPDATE: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):  # fmt: skip
    """``a·X + acc`` on a ``BLOCK_M × w`` piece of an output tile at ``(row0, col0)``, rounded
    and stored: through the output descriptor, or with ``UPDATE`` by plain stores (the update
    reads them back after a barrier, which does not wait for the descriptor's asynchronous
    stores)."""
    rows: tl.constexpr = acc.shape[0]
    width: tl.constexpr = acc.shape[1]
    x_tile = e_desc.load([b, row0, col0]).reshape(rows, width)
    result = _round(acc + a * x_tile.to(tl.float32), out_b.dtype.element_ty, EMULATE_RNE)
    if not UPDATE:
        o_desc.store([b, row0, col0], result.reshape(1, rows, width))
    else:
        r64 = (row0 + tl.arange(0, rows)).to(tl.int64)[:, None]
        c64 = (col0 + tl.arange(0, width)).to(tl.int64)[None, :]
        tl.store(out_b + r64 * LDX + c64, result, mask=(r64 < M) & (c64 < LDX))


@triton.jit
def _apply_tma_kernel(
    p_desc,  # (B, M, LDP) descriptor, block (1, BLOCK_M, BLOCK_K): the polynomial B
    x_desc,  # (B, M, LDX) descriptor, block (1, BLOCK_K, BLOCK_N): X as the right operand
    e_desc,  # (B, M, LDX) descriptor, block (1, BLOCK_M, BLOCK_N // 2): X in the epilogue
    o_desc,  # (B, M, LDX) descriptor, block (1, BLOCK_M, BLOCK_N // 2): the output
    out,  # the output's tensor (read back by the update)
    table,
    p_like,
    factors,
    lr,
    B,
    M,
    N,
    LDX,
    a,
    coef,
    decay,
    UPDATE: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    CAST_F32: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPDATE_ROWS: tl.constexpr,
):
    """``X' ← a·X + B·X`` (with ``UPDATE`` the parameter update too) as :func:`_apply_kernel`,
    for Hopper: persistent (one program per SM walks output tiles of the whole bucket, matrix by
    matrix, grouped within a matrix) with the operands read through TMA descriptors (3-D, so
    rows and columns past a matrix read as zeros and stores are clipped to it, and the loop's
    loads are asynchronous bulk copies the pipeliner overlaps with the previous tile's
    epilogue)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(LDX, BLOCK_N)
    per_matrix = tiles_m * tiles_n
    # Flattened, the pipeliner overlaps a tile's epilogue with the next tile's loads; with the
    # update's barrier and loops in the body it would not pipeline the products at all.
    tiles = B * per_matrix
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=not UPDATE):
        b = tile // per_matrix
        tm, tn = _grouped_tile(tile % per_matrix, tiles_m, tiles_n, GROUP_M)
        row0 = tm * BLOCK_M
        col0 = tn * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            pt = p_desc.load([b, row0, k0]).reshape(BLOCK_M, BLOCK_K)
            xt = x_desc.load([b, k0, col0]).reshape(BLOCK_K, BLOCK_N)
            acc = tl.dot(_operand(pt, CAST_F32), _operand(xt, CAST_F32), acc)
        # The epilogue in two column halves: half the shared memory for the X tile read and
        # the result written (a 128×256 tile's whole would not fit beside 3 stages).
        out_b = out + b.to(tl.int64) * M * LDX
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _tma_epilogue(left, e_desc, o_desc, out_b, b, row0, col0, M, LDX, a, UPDATE,
                      EMULATE_RNE)  # fmt: skip
        _tma_epilogue(right, e_desc, o_desc, out_b, b, row0, col0 + BLOCK_N // 2, M, LDX, a,
                      UPDATE, EMULATE_RNE)  # fmt: skip
        if UPDATE:
            # As in _apply_kernel: the tile went through the (cache-resident) output, and is
            # applied to the parameter in row slices.
            tl.debug_barrier()
            c64 = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
            _update_tile(out_b, table, b.to(tl.int64), row0, c64, M, N, LDX, p_like, factors, lr,
                         coef, decay, LR_TENSOR, EMULATE_RNE, BLOCK_M, UPDATE_ROWS)  # fmt: skip


@triton.jit
def _small_kernel(
    table,  # int64 (B, 6): g address, g row stride, g col stride, d address, d strides
    g_like,  # any tensor of the gradients' dtype (only its pointer type is used)
    d_like,  # any tensor of the buffers' dtype
    out,  # (B, M, N) contiguous output in the compute dtype (unused, but typed, if UPDATE)
    ptable,  # int64 (B, 3): parameter address, row stride, col stride (read only if UPDATE)
    p_like,  # any tensor of the parameters' dtype
    factors,  # (B,) float32: the LMO's factor s per matrix (read only if UPDATE)
    steps,  # float32 (STEPS, 3): the (a, b, c) of every step
    momentum,  # (1,) float32: α, read only if ALPHA_TENSOR
    lr,  # (1,) float32: γ, read only if LR_TENSOR
    M,
    N,
    alpha,
    beta,
    coef,
    decay,
    STEPS: tl.constexpr,
    HAS_BUF: tl.constexpr,
    UPDATE: tl.constexpr,
    ALPHA_TENSOR: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    CAST_F32: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The whole step for one small matrix per program, every intermediate in registers.

    Averaging as the prologue, ``X₀ = bf16((d/max|d|)/‖d/max|d|‖)``, then per step
    ``A = bf16(X·Xᵀ)``, ``B = bf16(b·A + c·A·A)``, ``X = bf16(a·X + B·X)`` (the rounding points
    of the tiled kernels), and the update of the tiled last step.
    """
    dtype = out.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N).to(tl.int64)[None, :]
    mask = (rows < M) & (cols < N)

    alpha, beta = _average_factors(momentum, alpha, beta, ALPHA_TENSOR)
    d = _average(table, b, rows, cols, mask, g_like, d_like, alpha, beta, HAS_BUF, EMULATE_RNE)

    # Divide by the largest entry first, so 1e-30 and 1e30 matrices neither under- nor overflow.
    amax = tl.max(tl.max(tl.abs(d), axis=1), axis=0)
    y = tl.div_rn(d, tl.where(amax > 0, amax, 1.0))
    norm = tl.sqrt_rn(tl.sum(tl.sum(y * y, axis=1), axis=0))
    inv = tl.where(norm > 0, tl.div_rn(1.0, tl.where(norm > 0, norm, 1.0)), 0.0)
    inv = tl.where(_finite(norm), inv, norm)  # a NaN/inf input stays non-finite
    x = _round(y * inv, dtype, EMULATE_RNE)

    for k in range(STEPS):
        a = tl.load(steps + 3 * k)
        bk = tl.load(steps + 3 * k + 1)
        c = tl.load(steps + 3 * k + 2)
        xo = _operand(x, CAST_F32)
        gram = _round(tl.dot(xo, tl.trans(xo)), dtype, EMULATE_RNE)
        go = _operand(gram, CAST_F32)
        poly = _round(c * tl.dot(go, go) + bk * gram.to(tl.float32), dtype, EMULATE_RNE)
        x = _round(tl.dot(_operand(poly, CAST_F32), xo) + a * x.to(tl.float32), dtype, EMULATE_RNE)

    if UPDATE:
        coef, decay = _update_factors(lr, coef, decay, LR_TENSOR)
        _update(ptable, b, rows, cols, mask, p_like, factors, x, coef, decay, EMULATE_RNE)
    else:
        tl.store(out + b * M * N + rows * N + cols, x, mask=mask)


# ------------------------------------------------------------------------------------ host


def _empty(bucket: NSBucket, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A work buffer (NaN-filled with the policy's ``poison``)."""
    if bucket.policy.poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=bucket.device)
    return torch.empty(shape, dtype=dtype, device=bucket.device)


def newton_schulz_bucket(
    bucket: NSBucket,
    grads: Sequence[tuple[int, int, int]],
    g_like: Tensor,
    coefficients: Sequence[Triple],
    *,
    alpha: float = 1.0,
    bufs: Sequence[tuple[int, int, int]] | None = None,
    d_like: Tensor | None = None,
    params: Sequence[tuple[int, int, int]] | None = None,
    p_like: Tensor | None = None,
    factors: Sequence[float] | None = None,
    coef: float = 0.0,
    decay: float = 1.0,
    lr: Tensor | None = None,
    momentum: Tensor | None = None,
    gram: bool = False,
) -> Tensor | None:
    """Average, normalize, orthogonalize and (optionally) apply the update for one bucket.

    Args:
        bucket: the bucket's shape, compute dtype, path and tile sizes.
        grads: the gradient matrices' table rows (:func:`matrix_rows`), one per matrix.
        g_like: a tensor of the gradients' dtype.
        coefficients: the per-step ``(a, b, c)`` triples.
        alpha: the averaging factor α; with ``bufs`` the buffers are updated in place as
            ``d ← (1 − α)·d + α·g``.
        bufs, d_like: the buffers' table rows and a tensor of their dtype, or ``None`` (d = g).
        params, p_like, factors, coef, decay: with the parameters' table rows, the result is not
            returned but applied as ``x ← decay·x + coef·f_b·X`` (``factors``: ``f_b`` per
            matrix).
        lr: γ as one float32 element on the device, or ``None``; with it the update is
            ``x ← (1 − decay·γ)·x + coef·γ·f_b·X``.
        momentum: α as one float32 element on the device (read there; ``alpha`` unused), or
            ``None``.
        gram: iterate on the Gram matrix (:func:`~scion_kernels.newton_schulz.gram_iterate`)
            where :func:`~scion_kernels.newton_schulz.uses_gram` says so (the tiled kernels
            then, whatever the bucket's size).

    Returns:
        The ``(B, m, n)`` stack of orthogonalized matrices (a view of rows padded to a multiple
        of 16 elements), or ``None`` when it was applied.
    """
    B, m, n, dtype, dev = bucket.batch, bucket.m, bucket.n, bucket.dtype, bucket.device
    flags = bucket.flags()
    d_rows = grads if bufs is None else bufs
    table6 = device_table([g + d for g, d in zip(grads, d_rows, strict=True)], torch.int64, dev)
    update = params is not None
    if update:
        assert factors is not None and p_like is not None
        ptable = device_table(params, torch.int64, dev)
        ftable = device_table([(f,) for f in factors], torch.float32, dev).reshape(-1)
    else:
        ptable, ftable, p_like = table6, table6, g_like  # typed placeholders, never read
    d_like = g_like if d_like is None else d_like
    gram = gram and uses_gram(m, n, coefficients, dtype)

    if bucket.small and not gram:
        out = _empty(bucket, (0,) if update else (B, m, n), dtype)
        _small_kernel[(B,)](
            table6, g_like, d_like, out, ptable, p_like, ftable,
            device_table(coefficients, torch.float32, dev),
            ftable if momentum is None else momentum, ftable if lr is None else lr,
            m, n, float(alpha), 1.0 - float(alpha), float(coef), float(decay),
            STEPS=len(coefficients), HAS_BUF=bufs is not None, UPDATE=update,
            ALPHA_TENSOR=momentum is not None, LR_TENSOR=lr is not None,
            BLOCK_M=bucket.pad_m, BLOCK_N=bucket.pad_n, num_warps=bucket.warps, **flags,
        )  # fmt: skip
        return None if update else out

    # Work matrices have their rows padded to a multiple of 16 elements, so every row starts
    # 32-byte aligned whatever m and n are: the compiler can then vectorize and pipeline the
    # loads (cp.async) of the tiled products (see bench/compile_report.py).
    ldx, ldm = _padded(n), _padded(m)
    x = _empty(bucket, (B, m, ldx), dtype)
    T = bucket.prologue_tile
    tiles = cdiv(m, T) * cdiv(n, T)
    partials = _empty(bucket, (B, tiles, 2), torch.float32)
    _prologue_kernel[(tiles * B,)](
        table6, g_like, d_like, partials, partials if momentum is None else momentum, m, n,
        float(alpha), 1.0 - float(alpha), HAS_BUF=bufs is not None,
        ALPHA_TENSOR=momentum is not None, EMULATE_RNE=bucket.interpret, BLOCK_M=T,
        BLOCK_N=T, num_warps=4,
    )  # fmt: skip
    scales = _empty(bucket, (B, 2), torch.float32)
    _scales_kernel[(B,)](partials, scales, tiles, BLOCK=max(16, min(1024, next_power_of_2(tiles))))
    # X₀ = d/‖d‖ rounded once, as the reference: d is read a second time (a memory-bound pass)
    # rather than rounded before the scale is known, which over- or underflows fp16.
    _normalize_kernel[(tiles * B,)](
        table6, d_like, x, scales, m, n, ldx,
        EMULATE_RNE=bucket.interpret, BLOCK_M=T, BLOCK_N=T, num_warps=4,
    )  # fmt: skip

    a_mat = _empty(bucket, (B, m, ldm), dtype)
    p_mat = _empty(bucket, (B, m, ldm), dtype)
    y = _empty(bucket, (B, m, ldx), dtype)

    def syrk(src, dst, k, c, b, config, *, has_d=False):
        launch_syrk(src, dst, k, c, b, config, flags, has_d=has_d)

    def apply(left, src, dst, a, config, *, last=False):
        launch_apply(
            left, src, dst, n, a, config, flags, update=last and update, ptable=ptable,
            p_like=p_like, ftable=ftable, coef=coef, decay=decay, lr=lr,
        )  # fmt: skip

    # Timing runs write a_mat, p_mat and y only: scratch that the steps below overwrite.
    def time_gram(cfg):
        syrk(x, a_mat, n, 1.0, 0.0, cfg)

    def time_poly(cfg):
        syrk(a_mat, p_mat, m, 1.0, 1.0, cfg, has_d=True)

    def time_apply(cfg):
        apply(p_mat, x, y, 1.0, cfg)

    if autotuning(bucket) and not all(
        tuned(bucket, k, i) for k, i in (("syrk", n), ("syrk", m), ("apply", n))
    ):
        a_mat.zero_()  # the timing runs read them before any step has written them
        p_mat.zero_()
    xxt = config(bucket, "syrk", n, time_gram)
    poly = config(bucket, "syrk", m, time_poly)
    prod = config(bucket, "apply", n, time_apply)

    last = len(coefficients) - 1
    if not gram:
        for step, (a, b, c) in enumerate(coefficients):
            syrk(x, a_mat, n, 1.0, 0.0, xxt)
            syrk(a_mat, p_mat, m, float(c), float(b), poly, has_d=True)
            apply(p_mat, x, y, float(a), prod, last=step == last)
            x, y = y, x
        return None if update else x[..., :n]

    # The Gram form (newton_schulz.gram_iterate, the same rounding points): every m×m product
    # is of two polynomials of one symmetric matrix, so symmetric, and takes the lower-triangle
    # tiles only (half the flops of a dense product).
    r, p = a_mat, p_mat
    q, t = _empty(bucket, (B, m, ldm), dtype), _empty(bucket, (B, m, ldm), dtype)

    def square(left, right, dst):
        launch_syrk(left, dst, m, 1.0, 0.0, poly, flags, right=right)

    every = gram_restart_every(dtype)
    syrk(x, r, n, 1.0, 0.0, xxt)  # R ← X·Xᵀ
    fresh = True  # Q = I
    for step, (a, b, c) in enumerate(coefficients):
        launch_syrk(r, p, m, float(c), float(b), poly, flags, has_d=True, diag=float(a))
        this = p
        if fresh:  # Q ← P (the buffers trade places; P is read from Q's below)
            q, p = p, q
        else:  # Q ← Q·P
            square(q, p, t)
            q, t = t, q
        fresh = False
        if step == last:
            break
        if (step + 1) % every == 0:  # X ← Q·X;  R ← X·Xᵀ;  Q ← I
            apply(q, x, y, 0.0, prod)
            x, y = y, x
            syrk(x, r, n, 1.0, 0.0, xxt)
            fresh = True
        else:  # R ← P·R·P = P·(R·P)
            square(r, this, t)
            square(this, t, r)
    apply(q, x, y, 0.0, prod, last=True)
    return None if update else y[..., :n]


def launch_syrk(
    src: Tensor,
    dst: Tensor,
    k: int,
    alpha: float,
    beta: float,
    config: dict,
    flags: dict,
    *,
    has_d: bool = False,
    right: Tensor | None = None,
    diag: float | None = None,
) -> None:
    """``dst ← α·src·rightᵀ + β·src + diag·I`` (``right`` ``None``: ``src``; ``β`` read only
    with ``has_d``, for a symmetric ``src``; the identity term only with a ``diag``) over the
    ``(B, m, ld)`` stacks: ``src`` and ``right`` hold ``m×k`` matrices, ``dst`` ``m×m`` ones,
    each with rows padded to the last dimension. One launch over the lower-triangle tiles, each
    stored twice, so the result is symmetric: with a ``right``, ``src·rightᵀ`` must be
    symmetric in exact arithmetic."""
    batch, m = dst.shape[0], dst.shape[1]
    tri = cdiv(m, config["BLOCK"])
    if config.get("TMA"):
        from triton.tools.tensor_descriptor import TensorDescriptor

        block, block_k = config["BLOCK"], config["BLOCK_K"]
        launch = {key: v for key, v in config.items() if key != "TMA"}
        _syrk_tma_kernel[(min(tri * (tri + 1) // 2 * batch, _programs(src.device)),)](
            TensorDescriptor.from_tensor(src, [1, block, block_k]),
            TensorDescriptor.from_tensor(src if right is None else right, [1, block, block_k]),
            TensorDescriptor.from_tensor(src, [1, block, block]),
            TensorDescriptor.from_tensor(dst, [1, block, block]),
            batch, m, k, float(alpha), float(beta), 0.0 if diag is None else float(diag),
            HAS_D=has_d, HAS_DIAG=diag is not None, **launch, **flags,
        )  # fmt: skip
        return
    _syrk_kernel[(tri * (tri + 1) // 2 * batch,)](
        src, src if right is None else right, src, dst, m, k, src.shape[-1], dst.shape[-1],
        float(alpha), float(beta), 0.0 if diag is None else float(diag), HAS_D=has_d,
        HAS_DIAG=diag is not None, **config, **flags,
    )  # fmt: skip


def launch_apply(
    p_mat: Tensor,
    src: Tensor,
    dst: Tensor,
    n: int,
    a: float,
    config: dict,
    flags: dict,
    *,
    update: bool = False,
    ptable: Tensor | None = None,
    p_like: Tensor | None = None,
    ftable: Tensor | None = None,
    coef: float = 0.0,
    decay: float = 1.0,
    lr: Tensor | None = None,
) -> None:
    """``dst ← a·src + p_mat·src`` over ``(B, m, ld)`` stacks (``src``, ``dst``: ``m×n``;
    ``p_mat``: ``m×m``); with ``update`` the result is also applied to the parameters of
    ``ptable`` as ``x ← decay·x + coef·f_b·dst`` (with a device ``lr`` γ:
    ``x ← (1 − decay·γ)·x + coef·γ·f_b·dst``). One launch."""
    batch, m = src.shape[0], src.shape[1]
    if ptable is None or ftable is None or p_like is None:
        if update:
            raise ValueError("launch_apply(update=True) needs ptable, p_like and ftable")
        ptable, ftable, p_like = p_mat, p_mat, src  # typed placeholders, never read
    if config.get("TMA"):
        _launch_apply_tma(
            p_mat, src, dst, n, a, config, flags, update, ptable, p_like, ftable, coef, decay, lr
        )
        return
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]) * batch,)
    _apply_kernel[grid](
        p_mat, src, dst, ptable, p_like, ftable, ftable if lr is None else lr, m, n,
        p_mat.shape[-1], src.shape[-1], float(a), float(coef), float(decay), UPDATE=update,
        LR_TENSOR=lr is not None, UPDATE_ROWS=min(32, config["BLOCK_M"]),
        **config, **flags,
    )  # fmt: skip


def _launch_apply_tma(
    p_mat: Tensor,
    src: Tensor,
    dst: Tensor,
    n: int,
    a: float,
    config: dict,
    flags: dict,
    update: bool,
    ptable: Tensor,
    p_like: Tensor,
    ftable: Tensor,
    coef: float,
    decay: float,
    lr: Tensor | None,
) -> None:
    """:func:`launch_apply` with the persistent TMA kernel (a ``config`` with ``TMA``): one
    program per SM, at most one per output tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, m, ldx = src.shape
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    tiles = cdiv(m, bm) * cdiv(ldx, bn) * batch
    grid = (min(tiles, _programs(src.device)),)
    launch = {k: v for k, v in config.items() if k != "TMA"}
    _apply_tma_kernel[grid](
        TensorDescriptor.from_tensor(p_mat, [1, bm, bk]),
        TensorDescriptor.from_tensor(src, [1, bk, bn]),
        TensorDescriptor.from_tensor(src, [1, bm, bn // 2]),
        TensorDescriptor.from_tensor(dst, [1, bm, bn // 2]),
        dst, ptable, p_like, ftable, ftable if lr is None else lr, batch, m, n, ldx, float(a),
        float(coef), float(decay), UPDATE=update, LR_TENSOR=lr is not None,
        UPDATE_ROWS=min(32, bm), **launch, **flags,
    )  # fmt: skip


def _programs(device: torch.device) -> int:
    """Programs of a persistent launch: the SMs of a GPU, 3 in the interpreter (more than one,
    fewer than the tiles, so the tests walk several tiles per program)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _padded(size: int) -> int:
    """``size`` rounded up to a multiple of 16 (a 32-byte row in bf16)."""
    return -(-size // 16) * 16


# --------------------------------------------------------------------- the backend's entry points


def ns_step_(policy: Policy, *args: Any) -> None:
    """``scion_kernels::ns_step_`` with the Triton kernels (arguments after ``policy``:
    :class:`~scion_kernels.backends.ops.NSStep`): the whole Scion step of one bucket, one
    launch per stage."""
    a = NSStep(*args)
    p_rows, g_rows, d_rows, owner = bucket_rows(a.params, a.grads, a.bufs, a.tall, a.m, a.n)
    mat_factors = [a.factors[i] for i in owner]
    if not mat_factors:
        return
    device = a.params[0].device
    with on_device(device):
        newton_schulz_bucket(
            NSBucket(len(mat_factors), a.m, a.n, a.dtype, device, policy),
            g_rows,
            a.grads[0],
            triples(a.coefficients),
            alpha=a.alpha,
            bufs=d_rows if a.bufs else None,
            d_like=a.bufs[0] if a.bufs else None,
            params=p_rows,
            p_like=a.params[0],
            factors=mat_factors,
            coef=a.coef,
            decay=a.decay,
            lr=a.lr,
            momentum=a.momentum,
            gram=a.gram,
        )


def polar_(
    policy: Policy, G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool = False
) -> Tensor:
    """``scion_kernels::polar`` with the Triton kernels: ``G``'s shape in ``dtype``."""
    r, c = G.shape[-2:]
    m, n, tall = orient(r, c)
    if G.numel() == 0:
        return torch.zeros(G.shape, dtype=dtype, device=G.device)
    mats = G.reshape(-1, r, c)
    bucket = NSBucket(mats.shape[0], m, n, dtype, G.device, policy)
    rows = matrix_rows(mats, mats.shape, transpose=tall)
    with on_device(G.device):
        X = newton_schulz_bucket(bucket, rows, G, triples(coefficients), gram=gram)
    assert X is not None
    return (X.mT if tall else X).reshape(G.shape).contiguous()


def polar(
    G: Tensor,
    coefficients: Sequence[Triple],
    dtype: torch.dtype = torch.bfloat16,
    gram: bool = False,
) -> Tensor:
    """Newton–Schulz ``polar(G)`` of every matrix of ``G`` (``(..., m, n)``) with the kernels.

    The same function as :func:`scion_kernels.newton_schulz` (``coefficients`` resolved to
    triples, ``gram`` the same option): returns ``G``'s shape in ``dtype``. Runs the
    ``scion_kernels::polar`` op on the registered ``"triton"`` backend.
    """
    if dtype not in HALF:
        raise ValueError(f"the Triton Newton–Schulz computes in bf16 or fp16; got {dtype}")
    return ops.polar(registry.get("triton"), G, flatten(coefficients), dtype, gram)
