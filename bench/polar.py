"""The polar factor of a batch of matrices ("polar" rows): time, matrix rate and accuracy.

Each backend maps a float32 batch ``G`` of shape ``(batch, m, n)`` to an approximation of
``polar(G) = U·Vᵀ``. Backends are entries of :func:`backends` (name → :class:`Backend`); a new
implementation (a Triton or CUDA Newton–Schulz) is one more entry there.

What a row holds, per (backend, coefficient set, shape):

- ``ms``: median time of one call on the whole batch (``Context.time_ms``). On CUDA the calls
  rotate over enough distinct inputs that together they exceed twice the L2 cache, so no call
  reads an input another call left in the cache.
- ``tflops``: the DENSE five-step Newton–Schulz count ``5·(4m²n + 2m³)·batch`` (``m ≤ n``,
  :func:`bench.common.newton_schulz_flops`) divided by the time, for every backend. For the SVD
  and the peers this is an equivalent rate: the same work as ours, so rates compare as times do.
- ``ceiling_fraction``: ``tflops`` over the matrix rate of the row's dtype measured once in the
  same run (:meth:`bench.common.Context.matrix_rate`): bf16 for the peers, which always compute
  in bf16, the compute dtype chosen for the device (``dtype`` column) for ours, float32 for the
  SVD.
- ``rel_err``: ``‖X − U·Vᵀ‖_F / ‖U·Vᵀ‖_F`` over the whole batch, against the exact polar factor
  from a float64 SVD (:func:`scion_kernels.polar_svd`, on the device of the run); ``sv_min`` and
  ``sv_max``: the extreme singular values of the output ``X`` (float64). Both are left out where
  the float64 SVD would be too slow (:func:`_exact_affordable`); the time is still measured.

Inputs are Gaussian float32, drawn per shape from a fixed seed on the run's device.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scion_kernels.newton_schulz import (
    default_compute_dtype,
    newton_schulz,
    polar_svd,
    resolve_coefficients,
)

from .common import Context, newton_schulz_flops

__all__ = ["FULL_SHAPES", "QUICK_SHAPES", "Backend", "available_backends", "run"]

PolarFn = Callable[[Tensor], Tensor]
Shape = tuple[int, int, int]  # (batch, m, n)

STEPS = 5
#: The quick suite: a square, a GPT-2 MLP matrix and a batch, with SVD and the float64
#: reference, in well under a minute on a 2-core CPU.
QUICK_SHAPES: list[Shape] = [
    (1, 256, 256),
    (1, 1024, 1024),
    (1, 768, 3072),
    (8, 256, 256),
]
_FULL_MATRICES: list[tuple[int, int]] = [
    *((s, s) for s in (256, 512, 1024, 2048, 4096, 8192)),
    (768, 768),  # GPT-2 small: attention output projection
    (768, 2304),  # fused q, k, v (stored 2304×768 as nn.Linear; the same polar work)
    (768, 3072),  # MLP
    (3072, 768),  # MLP, tall
    (2048, 5464),  # the wide benchmark shape of gram-newton-schulz
]
#: The full (GPU) suite: every matrix at batch 1, 8 and 32, less what does not fit.
FULL_SHAPES: list[Shape] = [(b, m, n) for (m, n) in _FULL_MATRICES for b in (1, 8, 32)]
#: The GPU check's suite (classic coefficients only), most wanted first: a stage stopped at
#: its time budget keeps what ran. 4096² is docs/performance.md's Newton–Schulz target.
CHECK_SHAPES: list[Shape] = [
    (1, 4096, 4096),
    (1, 768, 768),
    (1, 768, 2304),
    (1, 768, 3072),
    (1, 3072, 768),
    (32, 2048, 5464),
    (1, 1024, 1024),
    (1, 8192, 8192),
]
#: The check suite on a CPU: plumbing only.
TINY_SHAPES: list[Shape] = [(1, 64, 64), (2, 48, 96)]

#: Fraction of device memory one configuration may use.
MEMORY_FRACTION = 0.25
#: Rotated inputs per configuration on CUDA: at least this many bytes (× the L2 size) ...
L2_MULTIPLE = 2
#: ... but never more than this many tensors.
MAX_INPUTS = 512
#: A float32 SVD or float64 reference costs about ``batch·min(m,n)²·max(m,n)``; on CUDA it is
#: done for single matrices up to 4096 on the short side (seconds per call) and for batches up
#: to one 2048² matrix's work (cuSOLVER runs the matrices of a batch one after another), on a
#: CPU up to one 2048² matrix's work in all.
_SVD_BATCH_WORK_CUDA = 2048**3
_SVD_SINGLE_SIDE_CUDA = 4096
_SVD_WORK_CPU = 2048**3


@dataclass(frozen=True)
class Backend:
    """One way to compute the polar factor.

    ``make(coefficients)`` returns the callable ``G -> X`` for one coefficient set name (``None``
    for backends without one, such as the SVD); it is called afresh for every shape.
    ``per_shape`` marks callables that compile themselves for each shape on their first call
    (``torch.compile``): the compiler caches are reset before each shape and the first call is
    timed on its own. ``exact`` marks backends whose cost follows the SVD cap rather than
    Newton–Schulz's.
    """

    make: Callable[[str | None], PolarFn]
    coefficients: tuple[str | None, ...] = ("classic", "polar_express")
    dtype: torch.dtype = torch.bfloat16
    per_shape: bool = False
    exact: bool = False
    note: str = ""


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _ours(coefficients: str | None, gram: bool = False) -> PolarFn:
    return functools.partial(
        newton_schulz, coefficients=coefficients or "classic", steps=STEPS, gram=gram
    )


def _ours_compiled(coefficients: str | None) -> PolarFn:
    # Compiles scion_kernels.newton_schulz itself; shapes are static (one graph per shape).
    return torch.compile(_ours(coefficients), dynamic=False)


def _kernels(
    name: str,
    coefficients: str | None,
    gram: bool = False,
    wgmma: int = 0,
    persistent: bool = False,
) -> PolarFn:
    """Backend ``name``'s ``scion_kernels::polar`` op with ``coefficients`` (in the Gram form
    with ``gram``; for ``cuda`` with ``wgmma`` 1 to 4: the Hopper products, ``Policy.wgmma``,
    and ``Policy.persistent``),
    in bf16 unless the call says otherwise."""
    from scion_kernels import backends
    from scion_kernels.backends.ops import polar
    from scion_kernels.backends.tables import flatten

    table = flatten(resolve_coefficients(coefficients or "classic", STEPS))
    backend = backends.get(name)
    if wgmma:
        from scion_kernels.backends.cuda import NativeBackend, Policy

        policy = Policy(wgmma=wgmma, persistent=persistent)
        backend = NativeBackend(backend.module, {(8, 0): policy})
    return lambda G, dtype=torch.bfloat16: polar(backend, G, table, dtype, gram)


def _triton(coefficients: str | None) -> PolarFn:
    return _kernels("triton", coefficients)


def _native(coefficients: str | None) -> PolarFn:
    return _kernels("cuda", coefficients)


def _svd(coefficients: str | None) -> PolarFn:
    def polar(G: Tensor) -> Tensor:
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        return U @ Vh

    return polar


def _torch_muon() -> tuple[PolarFn, str] | str:
    """The orthogonalization inside ``torch.optim.Muon`` (2-D only), or why it is missing."""
    try:
        from torch.optim import _muon
    except ImportError as exc:
        return f"torch.optim._muon not importable ({exc})"
    fn = getattr(_muon, "_zeropower_via_newtonschulz", None)
    if fn is None:
        names = [n for n in dir(_muon) if "zeropower" in n.lower() or "newton" in n.lower()]
        if not names:
            return "no Newton–Schulz function found in torch.optim._muon"
        fn = getattr(_muon, names[0])
    abc = (
        getattr(_muon, "DEFAULT_A", 3.4445),
        getattr(_muon, "DEFAULT_B", -4.7750),
        getattr(_muon, "DEFAULT_C", 2.0315),
    )
    steps = getattr(_muon, "DEFAULT_NS_STEPS", STEPS)
    eps = getattr(_muon, "EPS", 1e-7)

    def polar(G: Tensor) -> Tensor:
        # Called as Muon calls it, once per 2-D matrix; a batch is a Python loop plus a stack.
        if G.shape[0] == 1:
            return fn(G[0], abc, steps, eps).unsqueeze(0)
        return torch.stack([fn(g, abc, steps, eps) for g in G])

    return polar, f"{_muon.__name__}.{fn.__name__}"


def _pytorch_optimizer() -> tuple[PolarFn, str] | str:
    """``zero_power_via_newton_schulz_5`` as pytorch_optimizer's SCION calls it, or why not."""
    try:
        from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5
    except ImportError as exc:
        return f"pytorch_optimizer not importable ({exc})"

    def polar(G: Tensor) -> Tensor:
        # SCION passes only num_steps: Muon's classic quintic, batched with baddbmm.
        return zero_power_via_newton_schulz_5(G, num_steps=STEPS)

    return polar, "zero_power_via_newton_schulz_5"


def available_backends(ctx: Context) -> dict[str, Backend]:
    """The backends available here, by the name rows carry; logs the ones that are missing."""
    ours = default_compute_dtype(ctx.device)  # what newton_schulz uses when given no dtype
    table: dict[str, Backend] = {
        "torch": Backend(_ours, dtype=ours, note="scion_kernels.newton_schulz, eager"),
        "torch_compile": Backend(
            _ours_compiled,
            dtype=ours,
            per_shape=True,
            note="torch.compile(newton_schulz, dynamic=False)",
        ),
    }
    if (ctx.quick or ctx.tiny) and ctx.device.type == "cpu":
        # The compiled function runs the same BLAS products on a CPU, after ~5 s of compiling.
        del table["torch_compile"]
        ctx.log("polar: torch_compile skipped in a quick CPU run (the same CPU products)")
    table |= {
        "svd": Backend(
            _svd,
            coefficients=(None,),
            dtype=torch.float32,
            exact=True,
            note="torch.linalg.svd fp32 then U·Vh; tflops = equivalent NS rate",
        ),
    }
    # The Gram form (polar="gram"): the same steps on X·Xᵀ for matrices at least twice as wide
    # as tall (others run the plain iteration, so only such shapes are worth the rows).
    gram_note = "; gram form (polar='gram')"
    table["torch-gram"] = Backend(
        functools.partial(_ours, gram=True), dtype=ours, note=table["torch"].note + gram_note
    )
    if ctx.device.type == "cuda":
        table["triton"] = Backend(_triton, note="the scion_kernels::polar op, Triton")
        table["triton-gram"] = Backend(
            functools.partial(_kernels, "triton", gram=True), note=table["triton"].note + gram_note
        )
    else:
        ctx.log("polar: triton skipped: the Triton kernels are timed on CUDA devices only")
    from scion_kernels import backends

    why = backends.get("cuda").unavailable_reason(ctx.device)
    if why is None:
        table["cuda"] = Backend(_native, note="the scion_kernels::polar op, CUDA C++")
        table["cuda-gram"] = Backend(
            functools.partial(_kernels, "cuda", gram=True), note=table["cuda"].note + gram_note
        )
        if ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) == (9, 0):
            # Policy(wgmma=1): a·X + B·X reads Xᵀ from registers; 2 ("-smem"): X from smem;
            # 3 ("-wide-apply"): that on 128×256 tiles; 4 ("-wide"): every product on 128×256
            # tiles; "-persistent": 3 with a block per SM (bench/NOTES.md: at 4096² the wide
            # triangle fills 2.06 waves of 132 SMs, the square one 4.0, so 3 is predicted best).
            variants = (("", 1, False), ("-smem", 2, False), ("-wide-apply", 3, False),
                        ("-wide", 4, False), ("-persistent", 3, True))  # fmt: skip
            for suffix, wgmma, persistent in variants:
                policy = f"Policy(wgmma={wgmma}, persistent={persistent})"
                note = table["cuda"].note + f"; Hopper's wgmma products ({policy})"
                kernels = functools.partial(_kernels, "cuda", wgmma=wgmma, persistent=persistent)
                table[f"cuda-wgmma{suffix}"] = Backend(kernels, note=note)
                table[f"cuda-wgmma{suffix}-gram"] = Backend(
                    functools.partial(kernels, gram=True), note=note + gram_note
                )
        else:
            ctx.log("polar: cuda-wgmma skipped: the wgmma products need compute capability 9.0")
    else:
        ctx.log(f"polar: cuda skipped: {why}")
    for name, probe in (
        ("torch.optim.Muon", _torch_muon),
        ("pytorch_optimizer.SCION", _pytorch_optimizer),
    ):
        found = probe()
        if isinstance(found, str):
            ctx.log(f"polar: {name} skipped: {found}")
            continue
        fn, where = found
        table[name] = Backend(lambda _c, fn=fn: fn, coefficients=("classic",), note=where)
    return table


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------


def _free(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _device_memory(ctx: Context) -> int:
    if ctx.device.type == "cuda":
        return int(torch.cuda.get_device_properties(ctx.device).total_memory)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _l2_bytes(ctx: Context) -> int:
    props = torch.cuda.get_device_properties(ctx.device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _num_inputs(ctx: Context, shape: Shape) -> int:
    """How many distinct inputs the timed calls rotate over (1 on a CPU)."""
    if ctx.device.type != "cuda":
        return 1
    one = 4 * math.prod(shape)
    return max(1, min(MAX_INPUTS, math.ceil(L2_MULTIPLE * _l2_bytes(ctx) / one)))


def _memory_estimate(shape: Shape, inputs: int, exact: bool) -> int:
    """Bytes a configuration needs at its peak, generously: the float32 inputs, Newton–Schulz's
    float32 normalization copies and bf16 iterates (~16 B per element), its two m×m products
    (~8 B per element), and, with ``exact``, the float64 SVD and reference (~48 B per element)."""
    b, m, n = shape
    elems, gram = b * m * n, b * min(m, n) ** 2
    need = 4 * elems * inputs + 16 * elems + 8 * gram
    if exact:
        need += 48 * elems + 16 * gram
    return need


def _exact_affordable(ctx: Context, shape: Shape) -> bool:
    """Whether an SVD of the whole batch is cheap enough to time or to use as the reference."""
    b, m, n = shape
    work = b * min(m, n) ** 2 * max(m, n)
    if ctx.device.type == "cuda":
        # The check suite has minutes: a 4096² SVD takes seconds per call, ×11 calls.
        side = 2048 if ctx.suite == "check" else _SVD_SINGLE_SIDE_CUDA
        return (b == 1 and min(m, n) <= side) or work <= _SVD_BATCH_WORK_CUDA
    return work <= _SVD_WORK_CPU


class _Cycling:
    """A no-argument callable that applies ``fn`` to the next input, round robin, and keeps the
    latest output for the first input (for the accuracy check after timing)."""

    def __init__(self, fn: PolarFn, inputs: list[Tensor]) -> None:
        self.fn, self.inputs, self.i = fn, inputs, 0
        self.first_output: Tensor | None = None

    def __call__(self) -> Tensor:
        i = self.i
        self.i = (i + 1) % len(self.inputs)
        out = self.fn(self.inputs[i])
        if i == 0:
            self.first_output = out
        return out


def _accuracy(X: Tensor, exact: Tensor) -> dict[str, float]:
    """``rel_err``, ``sv_min``, ``sv_max`` of an output against the float64 polar factor."""
    Xd = X.detach().to(torch.float64)
    err = torch.linalg.vector_norm(Xd - exact) / torch.linalg.vector_norm(exact)
    sv = torch.linalg.svdvals(Xd)
    return {"rel_err": float(err), "sv_min": float(sv.min()), "sv_max": float(sv.max())}


def _label(name: str, coefficients: str | None) -> str:
    return f"{name} ({coefficients})" if coefficients else name


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def run(
    ctx: Context, shapes: list[Shape] | None = None, *, backends: list[str] | None = None
) -> None:
    """Measure every available backend on every shape of the suite; one row per result.

    ``shapes`` overrides the suite (``QUICK_SHAPES``, ``FULL_SHAPES``, ``CHECK_SHAPES`` or on
    a CPU ``TINY_SHAPES``, by ``ctx.suite``), ``backends`` the backends timed (by row name;
    default: every one available). The check suite times classic coefficients only.
    """
    table = available_backends(ctx)
    if backends is not None:
        unknown = set(backends) - set(table)
        if unknown:
            ctx.log(f"polar: not available here, skipped: {sorted(unknown)}")
        table = {k: v for k, v in table.items() if k in backends}
    for dtype in sorted({b.dtype for b in table.values()}, key=str):
        rate = ctx.matrix_rate(dtype)
        ctx.log(f"polar: measured {dtype} matrix rate {rate:.4g} TFLOP/s on {ctx.device}")
    _free(ctx)
    if shapes is None:
        suites = {"quick": QUICK_SHAPES, "full": FULL_SHAPES, "check": CHECK_SHAPES}
        shapes = TINY_SHAPES if ctx.tiny else suites[ctx.suite]
    budget = MEMORY_FRACTION * _device_memory(ctx)
    disabled: dict[str, str] = {}

    for shape in shapes:
        b, m, n = shape
        dims = f"{b}×{m}×{n}"
        exact_ok = _exact_affordable(ctx, shape)
        inputs_n = _num_inputs(ctx, shape)
        need = _memory_estimate(shape, inputs_n, exact_ok)
        if need > budget:
            ctx.log(f"polar {dims}: skipped, needs ~{need / 2**30:.1f} GiB > {budget / 2**30:.1f}")
            continue
        if not exact_ok:
            ctx.log(f"polar {dims}: SVD backend and accuracy skipped (SVD too slow here)")
        gen = torch.Generator(device=ctx.device)
        gen.manual_seed(1_000_003 * b + 10_007 * m + n)
        inputs = [
            torch.randn(shape, generator=gen, device=ctx.device, dtype=torch.float32)
            for _ in range(inputs_n)
        ]
        try:
            exact = polar_svd(inputs[0]) if exact_ok else None
        except torch.OutOfMemoryError as exc:
            ctx.log(f"polar {dims}: float64 reference out of memory, accuracy skipped ({exc})")
            exact = None
        flops = newton_schulz_flops(m, n, STEPS, b)

        for name, backend in table.items():
            if name in disabled:
                continue
            if backend.exact and not exact_ok:
                continue
            if backend.per_shape:
                # One compiled graph per (shape, coefficients): start from empty caches so the
                # recompilation limit never sends a shape back to eager.
                torch._dynamo.reset()
            for coefficients in backend.coefficients:
                if name in disabled:
                    break
                if ctx.suite == "check" and coefficients not in (None, "classic"):
                    continue
                _measure(ctx, name, backend, coefficients, shape, inputs, exact, flops, disabled)
        del inputs, exact
        _free(ctx)
    for name, why in disabled.items():
        ctx.log(f"polar: {name} recorded nothing after: {why}")


def _measure(
    ctx: Context,
    name: str,
    backend: Backend,
    coefficients: str | None,
    shape: Shape,
    inputs: list[Tensor],
    exact: Tensor | None,
    flops: float,
    disabled: dict[str, str],
) -> None:
    """Time one (backend, coefficients, shape), check its output, add its row.

    A compiled backend's first call (compilation included) is timed on its own and reported in
    the note; the median excludes it, as it excludes every backend's warm-up call.
    """
    b, m, n = shape
    label = f"polar {_label(name, coefficients)} {b}×{m}×{n}"
    if not backend.exact:
        why = ctx.too_slow(flops, backend.dtype, calls=1 + ctx.repeats)
        if why:
            ctx.log(f"{label}: skipped, {why}")
            return
    note = backend.note
    if name == "torch.optim.Muon" and b > 1:
        note += "; 2-D only: looped over the batch, then stacked"
    first_s = None
    try:
        fn = backend.make(coefficients)
        if backend.per_shape:
            t0 = time.perf_counter()
            fn(inputs[0])
            ctx.sync()
            first_s = time.perf_counter() - t0
            note += f"; compile + first call {first_s:.1f} s, not in ms"
        call = _Cycling(fn, inputs)
        ms = ctx.time_ms(call)
    except torch.OutOfMemoryError as exc:
        ctx.log(f"{label}: out of memory, skipped ({(str(exc).splitlines() or [''])[0]})")
        _free(ctx)
        return
    except (RuntimeError, OSError, ImportError) as exc:
        # A compiler or library failure (torch.compile's errors are RuntimeErrors). A compiler
        # failure would repeat on every shape, so a compiled backend is dropped for the run.
        why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if backend.per_shape:
            disabled[name] = why
        ctx.log(f"{label}: failed{', backend dropped' if backend.per_shape else ''} ({why})")
        _free(ctx)
        return

    row: dict[str, Any] = {}
    if exact is not None and call.first_output is not None:
        row.update(_accuracy(call.first_output, exact))
    del call
    tflops = flops / (ms * 1e-3) / 1e12
    ctx.add(
        bench="polar",
        backend=name,
        ms=ms,
        shape=[b, m, n],
        **({"coefficients": coefficients} if coefficients else {}),
        dtype=str(backend.dtype).removeprefix("torch."),
        tflops=tflops,
        ceiling_fraction=tflops / ctx.matrix_rate(backend.dtype),
        **row,
        note=note,
    )
    err = f", rel_err {row['rel_err']:.3g}" if "rel_err" in row else ""
    extra = f" (compile + first call {first_s:.1f} s)" if first_s is not None else ""
    ctx.log(f"{label}: {ms:.4g} ms, {tflops:.3g} TFLOP/s{err}{extra}")
