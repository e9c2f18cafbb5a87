"""The three products of one Newton–Schulz step, kernel by kernel ("kernels" rows), beside
PyTorch's own products at the same shapes.

For a wide ``m×n`` stack ``X`` (``m ≤ n``, batch ``B``) one step is
- ``gram``: ``A ← X·Xᵀ`` (``2·B·m²·n`` dense FLOPs; ours computes the lower-triangle tiles and
  mirrors them, so about half);
- ``poly``: ``P ← b·A + c·A·A`` (``2·B·m³`` dense; symmetric, so again about half);
- ``apply``: ``X' ← a·X + P·X`` (``2·B·m²·n``).

Backends: ``triton`` (``scion_kernels.backends.triton.newton_schulz``'s launchers, each kernel's
default tile configuration, as a step uses them) and ``torch`` (``bmm`` and ``baddbmm`` into
preallocated outputs: cuBLAS on a GPU). The native CUDA C++ products have no per-product entry
point; their whole Newton–Schulz is timed by the ``polar`` benchmark. ``tflops`` counts the
dense FLOPs for both backends, so rows of one kernel compare as their times do, and a
symmetric product can exceed the matrix rate (``ceiling_fraction`` > 0.5 means it gains from
the symmetry).

Shapes: 4096² (docs/performance.md's target) and GPT-2 small's buckets, the hidden matrices of
its 12 blocks oriented wide (768×768, 768×2304, 768×3072 twice: ``c_fc`` and ``c_proj``). On a
CPU only the ``torch`` rows run (and the Triton ones in Triton's interpreter, at plumbing
sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import Context

__all__ = ["CHECK_SHAPES", "TINY_SHAPES", "run"]

Shape = tuple[int, int, int]
#: ``(batch, m, n)``, most wanted first.
CHECK_SHAPES: list[Shape] = [(1, 4096, 4096), (12, 768, 768), (12, 768, 2304), (24, 768, 3072)]
#: On a CPU: plumbing only.
TINY_SHAPES: list[Shape] = [(1, 64, 64), (2, 48, 96)]
#: One classic step's coefficients (the values only set the data, not the cost).
A, B, C = 3.4445, -4.7750, 2.0315
KERNELS = ("gram", "poly", "apply")


def _dense_flops(kernel: str, b: int, m: int, n: int) -> float:
    return 2.0 * b * m * m * (m if kernel == "poly" else n)


def _inputs(shape: Shape, device: torch.device, dtype: torch.dtype, ld: int, ldm: int):
    """``X`` (rows padded to ``ld``, padding zero, Frobenius norm 1 per matrix), ``A = X·Xᵀ``
    and ``P = b·A + c·A·A`` (rows padded to ``ldm``): the data of a real step."""
    b, m, n = shape
    gen = torch.Generator(device=device).manual_seed(10_007 * m + n + b)
    x32 = torch.randn((b, m, n), generator=gen, device=device)
    x32 /= torch.linalg.vector_norm(x32, dim=(-2, -1), keepdim=True)
    x = torch.zeros((b, m, ld), device=device, dtype=dtype)
    x[..., :n] = x32.to(dtype)
    xs = x[..., :n].float()
    a32 = xs @ xs.mT
    p32 = B * a32 + C * a32 @ a32
    a = torch.zeros((b, m, ldm), device=device, dtype=dtype)
    p = torch.zeros((b, m, ldm), device=device, dtype=dtype)
    a[..., :m], p[..., :m] = a32.to(dtype), p32.to(dtype)
    return x, a, p


def _torch_calls(x: Tensor, a: Tensor, p: Tensor, n: int) -> dict[str, Callable[[], Any]]:
    m = x.shape[1]
    xs, as_, ps = x[..., :n].contiguous(), a[..., :m].contiguous(), p[..., :m].contiguous()
    gram_out, poly_out, apply_out = (
        torch.empty_like(as_),
        torch.empty_like(ps),
        torch.empty_like(xs),
    )
    xt = xs.mT
    return {
        "gram": lambda: torch.bmm(xs, xt, out=gram_out),
        "poly": lambda: torch.baddbmm(as_, as_, as_, beta=B, alpha=C, out=poly_out),
        "apply": lambda: torch.baddbmm(xs, ps, xs, beta=A, out=apply_out),
    }


def _triton_calls(shape: Shape, x: Tensor, a: Tensor, p: Tensor) -> dict[str, Callable[[], Any]]:
    from scion_kernels.backends.triton import newton_schulz as kns
    from scion_kernels.backends.triton import tuning

    b, m, n = shape
    bucket = tuning.NSBucket(b, m, n, x.dtype, x.device)
    flags = bucket.flags()
    rows = {k: tuning.default_config(bucket, k) for k in ("syrk", "apply")}
    a_out, p_out, y = torch.empty_like(a), torch.empty_like(p), torch.empty_like(x)
    return {
        "gram": lambda: kns.launch_syrk(x, a_out, n, 1.0, 0.0, rows["syrk"], flags),
        "poly": lambda: kns.launch_syrk(a, p_out, m, C, B, rows["syrk"], flags, has_d=True),
        "apply": lambda: kns.launch_apply(p, x, y, n, A, rows["apply"], flags),
    }


def _triton_ready(ctx: Context) -> str | None:
    """Why the Triton kernels are not timed here, or ``None``."""
    try:
        from scion_kernels.backends.triton import unavailable_reason
    except ImportError as err:
        return f"Triton is not importable ({err})"
    return unavailable_reason(ctx.device)


def run(ctx: Context, shapes: list[Shape] | None = None, *, warm_only: bool = False) -> None:
    """Time each kernel of each backend at each shape; one row per (backend, kernel, shape).
    With ``warm_only`` every kernel runs once (compiling it) and nothing is recorded."""
    if shapes is None:
        shapes = TINY_SHAPES if ctx.tiny or ctx.device.type == "cpu" else CHECK_SHAPES
    why = _triton_ready(ctx)
    if why:
        ctx.log(f"kernels: triton skipped: {why}")
    on_gpu = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rate = None if warm_only else ctx.matrix_rate(dtype)
    for shape in shapes:
        b, m, n = shape
        ld, ldm = -(-n // 16) * 16, -(-m // 16) * 16
        x, a, p = _inputs(shape, ctx.device, dtype, ld, ldm)
        calls = {"torch": _torch_calls(x, a, p, n)}
        if why is None:
            calls["triton"] = _triton_calls(shape, x, a, p)
        for backend, fns in calls.items():
            for kernel in KERNELS:
                fn = fns[kernel]
                if warm_only:
                    fn()
                    continue
                ms = ctx.time_ms(fn)
                tflops = _dense_flops(kernel, b, m, n) / (ms * 1e-3) / 1e12
                ctx.add(
                    bench="kernels",
                    backend=backend,
                    kernel=kernel,
                    shape=[b, m, n],
                    dtype=str(dtype).removeprefix("torch."),
                    ms=ms,
                    tflops=tflops,
                    ceiling_fraction=tflops / rate,
                    note="dense-FLOP rate"
                    + ("; triton in the interpreter" if not on_gpu and backend == "triton" else ""),
                )
                ctx.log(
                    f"kernels {backend:<6} {kernel:<5} {b}×{m}×{n}: {ms:.4g} ms, "
                    f"{tflops:.4g} TFLOP/s"
                )
        ctx.sync()
        del x, a, p, calls
