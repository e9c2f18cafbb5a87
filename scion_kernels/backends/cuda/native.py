"""The native CUDA kernels (module ``scion_kernels._C``, ``backend="cuda"``): loading them, and
their host side, which the backend object (:class:`~scion_kernels.backends.cuda.NativeBackend`)
runs for the package's ops (:mod:`scion_kernels.backends.ops`).

The native module is built at install time when a CUDA toolchain is present (see setup.py). It
is imported lazily, on the first call that needs it: importing ``scion_kernels`` never fails
because of it, and its absence only surfaces, as a ``RuntimeError`` with build instructions,
when a native op is actually called. The ops' results are defined by the reference
(:mod:`scion_kernels.norms`); the kernels are tested against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ...newton_schulz import check_matrices, gram_restart_every, orient, uses_gram
from ..base import HALF
from ..ops import GroupedStep, NSStep
from ..tables import bucket_rows, group_rows, triples

__all__ = [
    "import_native",
    "native_available",
    "native_import_error",
    "ns_step_",
    "polar_",
    "require_native",
    "grouped_step_",
    "unavailable_reason",
]

_native: ModuleType | None = None
_native_error: str | None = None
_native_tried = False


def import_native() -> ModuleType | None:
    """The built module ``scion_kernels._C``, or ``None`` where it does not import."""
    global _native, _native_error, _native_tried
    if not _native_tried:
        try:
            _native = importlib.import_module("scion_kernels._C")
        except (ImportError, OSError) as exc:
            _native_error = f"{type(exc).__name__}: {exc}"
        _native_tried = True
    return _native


def native_available() -> bool:
    """Whether the native module ``scion_kernels._C`` can be imported. Never raises."""
    return import_native() is not None


def native_import_error() -> str | None:
    """Why ``scion_kernels._C`` could not be imported, or ``None`` if it imports."""
    import_native()
    return _native_error


def unavailable_reason(module: ModuleType | None) -> str | None:
    """Why the native kernels cannot run at all (``module`` ``None``: not built), or ``None``.
    Which devices they take is the backend's ``devices``
    (:class:`~scion_kernels.backends.cuda.NativeBackend`)."""
    if module is None:
        return (
            f"the native module scion_kernels._C is not available ({_native_error}); it is "
            "built at install time on a machine with a CUDA toolchain"
        )
    return None


def require_native(module: ModuleType | None) -> ModuleType:
    """``module``, or a ``RuntimeError`` with build instructions where it is ``None``."""
    if module is None:
        raise RuntimeError(
            "the native module scion_kernels._C is not available "
            f"({_native_error}). It is compiled when the package is installed on a machine with "
            "a CUDA toolchain (nvcc on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin): run "
            "`pip install -e . --no-build-isolation` in the source tree, without "
            "SCION_SKIP_NATIVE set; `pip install -v` shows why a build was skipped. The "
            "pure-PyTorch paths work without it."
        )
    return module


def _runs_on(device: torch.device, native: ModuleType | None) -> bool:
    """Whether the native kernels take tensors on ``device``: CUDA devices, and the CPU when
    ``native`` is the test suite's host emulation of the module (``EMULATED``)."""
    return device.type == "cuda" or (device.type == "cpu" and getattr(native, "EMULATED", False))


def _stream(device: torch.device) -> int:
    """The handle of ``device``'s current CUDA stream (0 on the CPU)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _check_like(
    op: str, i: int, tensors: Sequence[Tensor], first: Sequence[Tensor], device: torch.device
) -> None:
    """Tensor ``i``'s (x, g[, d]) share its shape, and each has the device and dtype of the
    first tensor's counterpart: one call runs one dtype combination on one device."""
    p = tensors[0]
    for name, t, f in zip(("param", "grad", "buffer"), tensors, first, strict=False):
        if t.shape != p.shape:
            raise ValueError(f"{op}: {name} {i} has shape {tuple(t.shape)}, its parameter "
                             f"{tuple(p.shape)}")  # fmt: skip
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on {device}; {name} {i} is on {t.device}")
        if t.dtype != f.dtype or t.dtype not in _CODES:
            raise TypeError(
                f"{op}: {name} {i} is {t.dtype}; every {name} of one call must have the first "
                f"one's dtype ({f.dtype}), one of float32, bfloat16, float16"
            )


def _native_device(t: Tensor, native: ModuleType, op: str) -> None:
    """Raise unless ``t`` is where the native kernels run."""
    if not _runs_on(t.device, native):
        raise ValueError(
            f"{op} runs on CUDA tensors only; got a tensor on {t.device.type} (the pure-PyTorch "
            "reference backend='torch' runs anywhere)"
        )


def _workspace(nbytes: int, device: torch.device) -> tuple[Tensor, int]:
    """A byte buffer of at least ``nbytes`` and its first 256-byte aligned address."""
    buf = torch.empty(nbytes + 256, dtype=torch.uint8, device=device)
    return buf, -(-buf.data_ptr() // 256) * 256


def ns_step_(
    module: ModuleType | None, tile: int, *args: Any, wgmma: int = 0, persistent: bool = False
) -> None:
    """``scion_kernels::ns_step_`` with the native kernels of ``module``, from one C++ call
    (arguments after ``tile``: :class:`~scion_kernels.backends.ops.NSStep`; the compute dtype
    bf16 or fp16); ``tile`` forces the product tile (64 or 128; 0 chooses); ``wgmma`` (1 to 4,
    :attr:`~scion_kernels.backends.cuda.Policy.wgmma`) runs the tiled products on Hopper's
    wgmma (tile 128; an sm_90a build on a compute capability 9.0 GPU, or the host
    emulation), with ``persistent`` a block per multiprocessor
    (:attr:`~scion_kernels.backends.cuda.Policy.persistent`)."""
    step = NSStep(*args)
    params, grads, bufs, tall, factors, m, n, dtype = step[:8]
    coefficients, alpha, coef, decay = step.coefficients, step.alpha, step.coef, step.decay
    op = "ns_step_"
    native = require_native(module)
    if dtype not in HALF:
        raise ValueError(f"{op}: the compute dtype must be bfloat16 or float16, got {dtype}")
    if not params:
        return
    device = params[0].device
    _native_device(params[0], native, op)
    for i, p in enumerate(params):
        tensors = (p, grads[i]) if not bufs else (p, grads[i], bufs[i])
        _check_like(op, i, tensors, (params[0], grads[0], *bufs[:1]), device)
        if p.numel() % (m * n):
            raise ValueError(f"{op}: param {i} of shape {tuple(p.shape)} is no stack of {m}×{n}")
    p_rows, g_rows, d_rows, owner = bucket_rows(params, grads, bufs, tall, m, n)
    p_addr = [a for a, _, _ in p_rows]
    g_addr = [a for a, _, _ in g_rows]
    d_addr = [a for a, _, _ in d_rows]
    strides = []
    for (_, ps, pc), (_, gs, gc), (_, ds, dc) in zip(p_rows, g_rows, d_rows or g_rows, strict=True):
        strides.extend((ps, pc, gs, gc, ds, dc))
    scales = [float(factors[i]) for i in owner]
    if not p_addr:
        return
    batch = len(p_addr)
    gram = step.gram and uses_gram(m, n, triples(coefficients), dtype)
    restart = gram_restart_every(dtype) if gram else 0
    nbytes = native.ns_workspace_bytes(batch, m, n, tile, restart, wgmma)
    buf, address = _workspace(nbytes, device)
    try:
        native.ns_step(
            m, n, _CODES[params[0].dtype], _CODES[grads[0].dtype],
            _CODES[bufs[0].dtype] if bufs else -1, _CODES[dtype], [float(c) for c in coefficients],
            float(alpha), float(coef), float(decay), _address(step.lr, device),
            _address(step.momentum, device), int(tile), p_addr, g_addr, d_addr, strides,
            scales, address, nbytes, device.index or 0, _stream(device), restart, int(wgmma),
            int(persistent),
        )  # fmt: skip
    except RuntimeError as exc:
        where = f"{batch} matrices of {m}×{n} on {device}"
        raise RuntimeError(f"{op} failed for {where}: {exc}") from exc
    del buf  # freed in stream order: the allocator hands it out only to later work


def _address(option: Tensor | None, device: torch.device) -> int:
    """The device address of a tensor ``lr`` or ``momentum`` the kernels read (one float32 on
    ``device``), or 0 for none."""
    if option is None:
        return 0
    if option.device != device or option.dtype != torch.float32 or option.numel() != 1:
        raise ValueError(
            f"a tensor lr or momentum must be one float32 element on {device}; got "
            f"{option.dtype} of shape {tuple(option.shape)} on {option.device}"
        )
    return option.data_ptr()


def polar_(
    module: ModuleType | None,
    tile: int,
    G: Tensor,
    coefficients: list[float],
    dtype: torch.dtype,
    gram: bool = False,
    wgmma: int = 0,
    persistent: bool = False,
) -> Tensor:
    """Newton–Schulz ``polar(G)`` of every matrix of ``G`` (``(..., m, n)``) with the native
    kernels: the step :func:`ns_step_` with ``x = 0``, ``decay = 1``, ``coef = 1`` and ``d = g``
    into a float32 matrix, returned in ``dtype`` (``G``'s shape)."""
    check_matrices(G, "polar")
    m, n, tall = orient(*G.shape[-2:])
    out = torch.zeros(G.shape, dtype=torch.float32, device=G.device)
    if G.numel():
        ns_step_(module, tile, [out], [G], [], [tall], [1.0], m, n, dtype, coefficients,
                 gram, 1.0, None, None, 1.0, 1.0, wgmma=wgmma, persistent=persistent)  # fmt: skip
    return out.to(dtype)


# --- Sign, ColNorm, RowNorm, BiasRMS -----------------------------------------------------------


def grouped_step_(module: ModuleType | None, *args: Any) -> None:
    """``scion_kernels::grouped_step_`` with the native kernel of ``module``, in one launch
    (arguments after it: :class:`~scion_kernels.backends.ops.GroupedStep`)."""
    step = GroupedStep(*args)
    params, grads, bufs, shapes, columns, q, eps, sign = step[:8]
    alpha, coef, decay = step.alpha, step.coef, step.decay
    op = "grouped_step_"
    native = require_native(module)
    if not params:
        return
    device = params[0].device
    _native_device(params[0], native, op)
    for i, p in enumerate(params):
        d = bufs[i] if bufs else grads[i]
        _check_like(op, i, (p, grads[i], d), (params[0], grads[0], bufs[0] if bufs else grads[0]),
                    device)  # fmt: skip
        r, c = shapes[2 * i], shapes[2 * i + 1]
        if p.numel() % (r * c):
            raise ValueError(f"{op}: param {i} of shape {tuple(p.shape)} is no stack of {r}×{c}")
    p_addr, g_addr, d_addr, layout, qs, epss = [], [], [], [], [], []
    for i, (pa, ga, da, *groups) in group_rows(params, grads, bufs, shapes, columns):
        p_addr.append(pa)
        g_addr.append(ga)
        if bufs:
            d_addr.append(da)
        layout.extend(groups)
        qs.append(float(q[i]))
        epss.append(float(eps[i]))
    dtypes = (params[0].dtype, grads[0].dtype, bufs[0].dtype if bufs else None)
    try:
        native.grouped_step(
            p_addr, g_addr, d_addr, layout, qs, epss, _CODES[dtypes[0]], _CODES[dtypes[1]],
            _CODES[dtypes[2]] if bufs else -1, bool(sign), float(alpha), float(coef),
            float(decay), _address(step.lr, device), _address(step.momentum, device),
            device.index or 0, _stream(device),
        )  # fmt: skip
    except RuntimeError as exc:
        raise RuntimeError(f"{op} failed for {len(p_addr)} tensors on {device}: {exc}") from exc
