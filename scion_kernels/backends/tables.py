"""Host side of the kernels' addressing: which views exist, and the device tables that name them.

The kernels reach their tensors through small tables of addresses and strides, so one launch
covers tensors scattered anywhere in memory. :func:`view_strides` decides, from shapes and
strides alone (no exception, so ``torch.compile`` traces it), whether a tensor can be seen as
the matrices a kernel wants; :func:`device_table` turns rows into a device tensor and keeps it,
so a step that sees the same tensors again (every step of a training run) copies nothing to the
device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._util import eager_cache

__all__ = [
    "bucket_rows", "cached", "cdiv", "device_table", "flatten", "group_rows", "matrix_rows",
    "next_power_of_2", "triples", "view_strides", "writable",
]  # fmt: skip


def flatten(coefficients: Sequence[Sequence[float]]) -> list[float]:
    """Per-step ``(a, b, c)`` triples as the flat list the ops take."""
    return [float(v) for triple in coefficients for v in triple]


def triples(flat: Sequence[float]) -> list[tuple[float, float, float]]:
    """The ops' flat coefficient list back as per-step ``(a, b, c)`` triples."""
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def cdiv(a: int, b: int) -> int:
    """``⌈a/b⌉`` (host side; ``triton.cdiv`` costs microseconds per call in recent Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


@eager_cache(maxsize=4096)
def view_strides(
    shape: tuple[int, ...], stride: tuple[int, ...], new_shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    """The strides of ``t.view(new_shape)`` for a tensor ``t`` of ``shape`` and ``stride``, or
    ``None`` when no such view exists (``t.view`` would raise).

    A view can only merge or split runs of dimensions that are laid out as one block: the
    dimensions are walked from the last, grouped into maximal runs where
    ``stride[i] == stride[i+1]·shape[i+1]`` (size-1 dimensions never break a run), and each run
    must be covered exactly by consecutive dimensions of ``new_shape``. Empty tensors are
    answered ``None`` (the kernels never take them). Arguments are tuples (cached: a training
    step asks the same questions every time).
    """
    numel = 1
    for size in shape:
        numel *= size
    new_numel = 1
    for size in new_shape:
        new_numel *= size
    if numel == 0 or numel != new_numel:
        return None
    if len(shape) == 0:
        return (1,) * len(new_shape)

    out = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    base = stride[-1]  # the stride of the current run's innermost element
    run_numel, view_numel = 1, 1
    for d in range(len(shape) - 1, -1, -1):
        run_numel *= shape[d]
        run_ends = d == 0 or (shape[d - 1] != 1 and stride[d - 1] != run_numel * base)
        if not run_ends:
            continue
        while view_d >= 0 and (view_numel < run_numel or new_shape[view_d] == 1):
            out[view_d] = view_numel * base
            view_numel *= new_shape[view_d]
            view_d -= 1
        if view_numel != run_numel:
            return None
        if d > 0:
            base = stride[d - 1]
            run_numel, view_numel = 1, 1
    if view_d != -1:
        return None
    return tuple(out)


def writable(t: Tensor) -> bool:
    """Whether the kernels may write ``t`` element by element: no two of its elements share
    memory through a zero stride (an expanded tensor). In-place PyTorch ops refuse such
    tensors; left to the reference path, they get PyTorch's error."""
    return all(stride != 0 or size <= 1 for size, stride in zip(t.shape, t.stride(), strict=True))


#: Device tables kept by content, least recently used first. A table is a pure function of its
#: rows, so a kept one is right whatever tensor the addresses belong to now.
_TABLES: dict[tuple, Tensor] = {}
#: Tables a CUDA graph was captured with: a replay reads them, so they are kept for good.
_CAPTURED: dict[tuple, Tensor] = {}
TABLE_CACHE_SIZE = 512


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cached(key: tuple, build: Callable[[], Tensor], device: torch.device) -> Tensor:
    """The table kept under ``key`` on ``device``, made from ``build()`` (a CPU tensor) the
    first time. ``key`` must name the table's whole content (with its device and dtype).

    On a GPU a new table is copied from pinned memory without waiting (no host
    synchronization, whether a step sees new addresses or not; PyTorch keeps the pinned block
    until the copy is done). While a CUDA graph is being captured a table must already exist
    (the warm-up steps before a capture make them): making one would allocate and copy inside
    the graph. Tables used in a capture are kept for good.
    """
    table = _CAPTURED.get(key)
    if table is not None:
        return table
    capturing = _capturing(device)
    table = _TABLES.pop(key, None)
    if table is None:
        if capturing:
            raise RuntimeError(
                "scion_kernels: a kernel table was first needed while a CUDA graph was being "
                "captured; run the step eagerly on the same tensors first (warm-up steps, as "
                "torch.cuda.graphs asks), then capture"
            )
        if len(_TABLES) >= TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))
        host = build()
        if device.type == "cuda":
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
    if capturing:
        _CAPTURED[key] = table
    else:
        _TABLES[key] = table  # the most recently used goes last
    return table


def device_table(
    rows: Sequence[Sequence[int | float]], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``rows`` (equal-width tuples) as a ``(len(rows), width)`` tensor of ``dtype`` on
    ``device``, copied there only the first time these rows are asked for (:func:`cached`)."""
    key = (device, dtype, tuple(map(tuple, rows)))
    return cached(key, lambda: torch.tensor(key[2], dtype=dtype).reshape(len(rows), -1), device)


def matrix_rows(
    t: Tensor, shape: tuple[int, ...], transpose: bool = False
) -> tuple[tuple[int, int, int], ...]:
    """``(address, row stride, column stride)`` (strides in elements) of each matrix of ``t``
    seen as ``shape = (B, r, c)`` (a view must exist), without making the views; ``transpose``
    swaps the two strides, so the kernels see the matrix transposed."""
    return _matrix_rows(t.data_ptr(), t.shape, t.stride(), t.element_size(), shape, transpose)


@functools.lru_cache(maxsize=8192)  # called inside ops only: never traced
def _matrix_rows(
    base: int,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    size: int,
    new_shape: tuple[int, ...],
    transpose: bool,
) -> tuple[tuple[int, int, int], ...]:
    strides = view_strides(shape, stride, new_shape)
    assert strides is not None, f"no view of {shape} as {new_shape}"
    step, sr, sc = strides
    if transpose:
        sr, sc = sc, sr
    return tuple((base + i * step * size, sr, sc) for i in range(new_shape[0]))


Rows = list[tuple[int, int, int]]


def bucket_rows(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    tall: Sequence[bool],
    m: int,
    n: int,
) -> tuple[Rows, Rows, Rows, list[int]]:
    """The matrices of a Newton–Schulz bucket: tensor ``i`` is a stack of ``m×n`` matrices
    (``n×m`` where ``tall[i]``, seen transposed). Returns the :func:`matrix_rows` of every
    matrix of the parameters, gradients and buffers (none without ``bufs``), all oriented
    ``m×n``, and the owning tensor of each matrix."""
    p_rows: Rows = []
    g_rows: Rows = []
    d_rows: Rows = []
    owner: list[int] = []
    for i, p in enumerate(params):
        count = p.numel() // (m * n)
        shape = (count, n, m) if tall[i] else (count, m, n)
        p_rows.extend(matrix_rows(p, shape, transpose=tall[i]))
        g_rows.extend(matrix_rows(grads[i], shape, transpose=tall[i]))
        if bufs:
            d_rows.extend(matrix_rows(bufs[i], shape, transpose=tall[i]))
        owner.extend([i] * count)
    return p_rows, g_rows, d_rows, owner


def group_rows(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    shapes: Sequence[int],
    columns: Sequence[bool],
) -> list[tuple[int, tuple[int, ...]]]:
    """The matrices of a grouped launch: tensor ``i`` is seen as ``(-1, r, c)`` matrices
    (``r, c = shapes[2i:2i+2]``, the same strides for ``x``, ``g`` and ``d``; ``d = g`` without
    ``bufs``) whose groups are rows, or columns where ``columns[i]``. Returns, per matrix, its
    tensor's index and ``(x, g, d addresses, groups, group length, group stride, element
    stride)``."""
    out: list[tuple[int, tuple[int, ...]]] = []
    for i, p in enumerate(params):
        r, c = shapes[2 * i], shapes[2 * i + 1]
        d = bufs[i] if bufs else grads[i]
        shape = (p.numel() // (r * c), r, c)
        # The groups are the rows of the (transposed, for columns) matrices.
        mats = [matrix_rows(t, shape, transpose=columns[i]) for t in (p, grads[i], d)]
        groups, length = (c, r) if columns[i] else (r, c)
        for (pa, gs, es), (ga, *_), (da, *_) in zip(*mats, strict=True):
            out.append((i, (pa, ga, da, groups, length, gs, es)))
    return out
