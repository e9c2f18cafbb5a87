"""The orthogonal polar factor: batched Newton–Schulz in low precision, and the exact SVD form.

For ``G = U·Σ·Vᵀ`` (thin SVD) the polar factor is ``polar(G) = U·Vᵀ``. Newton–Schulz approximates
it with a fixed number of odd quintic steps on ``X₀ = G / ‖G‖_F``::

    A ← X·Xᵀ              (m×m, symmetric; m ≤ n after orienting the matrix wide)
    B ← b·A + c·A·A
    X ← a·X + B·X

which maps every singular value σ of ``X₀`` through the scalar polynomial ``p(σ) = aσ + bσ³ + cσ⁵``
and leaves ``U`` and ``V`` alone. The coefficient sets (:data:`COEFFICIENTS`) trade exactness
for speed: in 5 steps ``classic`` (Muon's, used by the Scion authors) sends σ ∈ [10⁻³, 1] into
about [0.47, 1.20], ``you`` into [0.48, 1.15], ``polar_express`` (Amsel et al., 2025) into
[0.86, 1.14]; ``deepseek_v4``'s 10 steps into [1.0000, 1.0005].

The Gram form (:func:`gram_iterate`, ``gram=True``) computes the same steps on the ``m×m``
matrix ``X·Xᵀ`` for wide matrices, in fewer flops and with a larger rounding error.

The operands' dtype follows the hardware unless it is given (:func:`default_compute_dtype`):
bf16 on GPUs and on CPUs with bf16 matrix instructions, float32 on other CPUs, which have no
fast bf16 product (a 1024³ bf16 product is about 100× slower than float32 on an AVX2-only CPU).
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "COEFFICIENTS",
    "PRECONDITIONED",
    "aol_",
    "cans_coefficients",
    "check_matrices",
    "cpu_has_bf16_matmul",
    "default_compute_dtype",
    "describe_device",
    "newton_schulz",
    "orient",
    "polar_svd",
    "preconditioning",
    "resolve_coefficients",
]

Triple = tuple[float, float, float]

# Jiacheng You's five per-step quintics (the "you" and "turbo_muon" presets below).
_YOU: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

#: Named coefficient sets: step ``i`` uses ``set[min(i, len(set) - 1)]``. A set of one triple
#: runs 5 steps by default, a longer set one step per triple (``steps`` changes either). The
#: image of σ ∈ [10⁻³, 1] under each default composition, in float64, is in the comments
#: (``tests/test_newton_schulz.py`` checks them).
COEFFICIENTS: dict[str, tuple[Triple, ...]] = {
    # Muon's quintic (Jordan et al., 2024), the one the Scion authors use, repeated every step:
    # [0.4705, 1.2024].
    "classic": ((3.4445, -4.7750, 2.0315),),
    # The textbook cubic Newton–Schulz (Björck & Bowie, 1971; Higham, 2008), converging to the
    # exact polar factor but slowly from small σ: [0.0076, 1.0] after 5 steps.
    "cubic": ((1.5, -0.5, 0.0),),
    # Jiacheng You's per-step quintics (2025), from the coefficient search Cesista describes,
    # as modded-nanogpt's medium track uses them: [0.4750, 1.1450]; [0.9778, 1.0318] from 10⁻².
    "you": _YOU,
    # DeepSeek-V4's schedule: eight classic steps, then two of (2, −1.5, 0.5), a quintic with
    # p(1) = 1 and p'(1) = 0 that polishes the values near 1: [1.0000, 1.0005] in 10 steps.
    "deepseek_v4": ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2,
    # Turbo-Muon (Boissin et al., 2025): the AOL-preconditioned matrix (:data:`PRECONDITIONED`,
    # :func:`aol_`) in place of G/‖G‖_F, then the last four of ``you``'s steps, as its
    # reference implementation runs them: [0.1204, 1.1450]; [0.9727, 1.1450] from 10⁻². (A
    # later table fitted for AOL, (4.0098, −7.0585, 2.4635), …, maps σ ≥ 0.884 to negative
    # values, and AOL gives σ = 1 to any rank-one matrix: not taken.)
    "turbo_muon": _YOU[1:],
    # Polar Express (Amsel, Persson, Musco, Gower, 2025): the optimal 5-step composition for
    # σ ∈ [1e-3, 1] with safety factor 1.02 and cushion 2, as modded-nanogpt uses it. Composed
    # in float64 it maps [1e-3, 1] into [0.8589, 1.1411] (tests/test_newton_schulz.py checks).
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """``rows·x = rhs`` by Gaussian elimination with partial pivoting (a few unknowns, float64
    Python arithmetic: the same bits on every machine)."""
    n = len(rhs)
    m = [list(r) + [v] for r, v in zip(rows, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _minimax_odd(lo: float, hi: float, degree: int) -> tuple[Triple, float]:
    """The odd polynomial ``p`` of ``degree`` 3 or 5 closest to 1 on ``[lo, hi]`` in the max
    norm, as an ``(a, b, c)`` triple (``p(σ) = aσ + bσ³ + cσ⁵``), and its error ``E``: ``p``
    maps ``[lo, hi]`` into ``[1 − E, 1 + E]``, reaching ``1 − E`` at ``lo`` and ``hi``.
    Degree 3 in closed form (``1 − p`` equioscillates at ``lo``, the critical point and ``hi``);
    degree 5 by the Remez exchange on four points."""
    if degree == 3:
        s = lo * lo + lo * hi + hi * hi  # p(lo) = p(hi) fixes a = −b·s; p'(√(s/3)) = 0
        b = -2.0 / (lo * hi * (lo + hi) + (2.0 * s / 3.0) * math.sqrt(s / 3.0))
        a = -b * s
        return (a, b, 0.0), 1.0 - (a * lo + b * lo**3)
    points = [lo, lo + 0.3 * (hi - lo), lo + 0.8 * (hi - lo), hi]
    for _ in range(100):
        rows = [[x, x**3, x**5, (-1.0) ** i] for i, x in enumerate(points)]
        a, b, c, err = _solve(rows, [1.0] * 4)
        # The interior extrema of 1 − p: p'(σ) = a + 3bσ² + 5cσ⁴ = 0, a quadratic in σ².
        root = math.sqrt(9.0 * b * b - 20.0 * a * c)
        inner = sorted(math.sqrt((-3.0 * b + sign * root) / (10.0 * c)) for sign in (1.0, -1.0))
        moved = [lo, *inner, hi]
        if max(abs(x - y) for x, y in zip(moved, points, strict=True)) < 1e-15:
            break
        points = moved
    return (a, b, c), abs(err)


def cans_coefficients(steps: int = 5, lower: float = 1e-3, degree: int = 5) -> tuple[Triple, ...]:
    """CANS (Grishina, Smirnov, Rakhuba, 2025: Chebyshev-accelerated Newton–Schulz): ``steps``
    odd polynomials of ``degree`` 3 or 5, each the best uniform approximation of 1 on where
    the previous ones sent ``[lower, 1]``::

        [ℓ, u] ← [lower, 1]
        for each step:  p ← the odd polynomial closest to 1 on [ℓ, u] (max norm), error E;
                        [ℓ, u] ← [1 − E, 1 + E]

    Degree 5 with ``lower = 10⁻³`` is Polar Express's composition without its safety factor
    and cushion (``"cans"`` in :data:`COEFFICIENTS`); degree 3 is the closed-form cubic
    (``"cans_cubic"``). Computed in float64 Python arithmetic, so the same on every machine.
    """
    if degree not in (3, 5):
        raise ValueError(f"CANS polynomials have degree 3 or 5; got {degree}")
    if not 0.0 < lower < 1.0:
        raise ValueError(f"CANS needs a lower bound in (0, 1); got {lower}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"CANS steps must be a positive integer; got {steps!r}")
    lo, hi, table = lower, 1.0, []
    for _ in range(steps):
        triple, err = _minimax_odd(lo, hi, degree)
        table.append(triple)
        lo, hi = 1.0 - err, 1.0 + err
    return tuple(table)


# CANS's quintics for σ ∈ [1e-3, 1] (Polar Express's without safety factor): [0.8866, 1.1134].
COEFFICIENTS["cans"] = cans_coefficients(5, 1e-3, 5)
# CANS's cubics, 8 steps (16 products, against the quintics' 15): [0.9463, 1.0537].
COEFFICIENTS["cans_cubic"] = cans_coefficients(8, 1e-3, 3)

#: Presets whose steps start from a preconditioned matrix, by name: ``"aol"`` (:func:`aol_`).
PRECONDITIONED: dict[str, str] = {"turbo_muon": "aol"}

DEFAULT_STEPS = 5
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _cpuinfo(field: str) -> str:
    """The first ``field`` line of ``/proc/cpuinfo`` (``""`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(field)), "")
    except OSError:
        return ""


def _probe_cpu_bf16_matmul() -> bool:
    probes = [getattr(torch.cpu, f"_is_{n}_supported", None) for n in ("avx512_bf16", "amx_tile")]
    if any(probe is not None for probe in probes):
        return any(bool(probe()) for probe in probes if probe is not None)
    flags = _cpuinfo("flags").split()  # a PyTorch without the probes: the kernel's list
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Read once, at import: a plain constant is what torch.compile can trace.
_CPU_BF16_MATMUL = _probe_cpu_bf16_matmul()


def cpu_has_bf16_matmul() -> bool:
    """Whether this machine's CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX on
    x86). Elsewhere (AVX2-only x86, other architectures) PyTorch's bf16 products on the CPU are
    emulated and far slower than float32 ones."""
    return _CPU_BF16_MATMUL


def describe_device(device: torch.device | str) -> str:
    """The device for results tables: a GPU's name, or the CPU's model name with the cores this
    process may use and the vector unit PyTorch dispatches to (``+ bf16`` with bf16 matrix
    instructions), e.g. ``AMD EPYC (2 cores, AVX2)``: CPUs of one model name differ in the
    last, and so do their timings."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    unit = torch.backends.cpu.get_cpu_capability() + (" + bf16" if cpu_has_bf16_matmul() else "")
    return f"{name} ({cores} cores, {unit})"


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """The Newton–Schulz operand dtype used when none is given (``ns_dtype=None``).

    bf16 (with float32 accumulation) wherever the hardware multiplies bf16 matrices natively:
    every GPU, and CPUs with AVX512-BF16 or AMX (:func:`cpu_has_bf16_matmul`). float32 on other
    CPUs, where bf16 would be about 50–100× slower and float32 is also more accurate.
    """
    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_bf16_matmul():
        return torch.float32
    return torch.bfloat16


def resolve_coefficients(
    coefficients: str | Sequence[Sequence[float]] = "classic", steps: int | None = None
) -> tuple[Triple, ...]:
    """Return the per-step ``(a, b, c)`` triples, one per Newton–Schulz step.

    ``coefficients`` is a name from :data:`COEFFICIENTS` or an explicit sequence of triples.
    ``steps`` defaults to 5 for a named set of one triple, to the number of triples for a
    longer one and for an explicit one; a set shorter than ``steps`` repeats its last triple,
    a longer one is cut.
    """
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENTS:
            raise ValueError(
                f"unknown Newton–Schulz coefficient set {coefficients!r}; "
                f"expected one of {sorted(COEFFICIENTS)} or a sequence of (a, b, c) triples"
            )
        table = COEFFICIENTS[coefficients]
        n = (DEFAULT_STEPS if len(table) == 1 else len(table)) if steps is None else steps
    else:
        try:
            table = tuple((float(a), float(b), float(c)) for a, b, c in coefficients)
        except (TypeError, ValueError) as err:
            raise ValueError(
                "Newton–Schulz coefficients must be a set name or a sequence of (a, b, c) "
                f"triples of numbers; got {coefficients!r}"
            ) from err
        if not table:
            raise ValueError("Newton–Schulz coefficients: the sequence of triples is empty")
        if not all(map(_finite, (x for t in table for x in t))):
            raise ValueError(f"Newton–Schulz coefficients must be finite; got {table}")
        n = len(table) if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Newton–Schulz steps must be a positive integer; got {steps!r}")
    return tuple(table[min(i, len(table) - 1)] for i in range(n))


def preconditioning(coefficients: str | Sequence[Sequence[float]]) -> str | None:
    """The preconditioning a coefficient preset starts from (:data:`PRECONDITIONED`), or
    ``None``: Newton–Schulz starts from ``G/‖G‖_F``."""
    return PRECONDITIONED.get(coefficients) if isinstance(coefficients, str) else None


def aol_(X: Tensor) -> Tensor:
    """Scale the rows of a wide stack ``X`` (``(B, m, n)``) in place by
    ``s_i = (Σ_j |X·Xᵀ|_ij)^(−1/2)`` and return it: the almost-orthogonal layer's rescaling
    (Prach & Lampert, 2022), which Turbo-Muon uses in place of the Frobenius normalization.
    ``‖diag(s)·X‖₂ ≤ 1`` (the rescaled Gram matrix's rows sum to at most 1 in absolute value),
    and ``diag(s)·X`` is usually closer to orthogonal than ``X/‖X‖_F``, so fewer steps are
    needed; its polar factor is not ``X``'s unless the rows are already orthogonal. ``X·Xᵀ``
    is one product in ``X``'s dtype (a third of a step's work), its row sums in float32 (float64
    for float64): rounded to bf16 they may let the norm exceed 1 by about 2⁻⁹, inside every
    preset's margin. A zero row stays zero."""
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    sums = torch.bmm(X, X.mT).to(work).abs_().sum(dim=-1, keepdim=True)
    scale = torch.where(sums > 0, sums.rsqrt(), torch.zeros_like(sums))
    if X.dtype == work:
        return X.mul_(scale)
    return X.copy_(X.to(work).mul_(scale))


def orient(rows: int, cols: int) -> tuple[int, int, bool]:
    """The orientation Newton–Schulz runs a ``rows×cols`` matrix in: ``(m, n, tall)`` with
    ``m ≤ n``; a tall matrix (more rows than columns) is iterated transposed, on its smaller
    Gram matrix. Every path (the reference, the plan, the kernels) orients by this."""
    return (cols, rows, True) if rows > cols else (rows, cols, False)


def check_matrices(G: Tensor, what: str) -> None:
    """Raise unless ``G`` is a stack of matrices ``(..., m, n)`` (``what`` names the caller)."""
    if G.ndim < 2:
        raise ValueError(f"{what} needs matrices (..., m, n); got shape {tuple(G.shape)}")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# Frobenius norms in [2⁻⁶⁰, 2⁶⁰] are computed without over- or underflow in float32; outside,
# the matrix is first divided by its largest entry.
_SAFE_NORM = (2.0**-60, 2.0**60)


def normalized_stack(mats: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``M / ‖M‖_F`` for every matrix of ``mats`` (each ``(B_i, m, n)``), stacked, in ``dtype``.

    The matrices are copied into one contiguous stack in float32 (float64 for float64 input or
    compute dtype), their norms taken there, and each scaled matrix rounded once to ``dtype``: a few
    operations per call, whatever the number of matrices. Zero-safe and without an ε floor: a
    zero matrix stays zero, a matrix of 1e-30 or 1e30 entries still gets norm 1, because such
    matrices are first divided by their largest entry. On CUDA and while ``torch.compile``
    traces, that pre-scale always runs (one more memory-bound pass, no host sync, so CUDA
    graphs and the compiler see one graph); elsewhere it runs only when a norm falls outside
    [2⁻⁶⁰, 2⁶⁰] (one host sync to find out). Non-finite input gives non-finite output.
    """
    device = mats[0].device
    m, n = mats[0].shape[-2:]
    work_dtype = _norm_dtype(mats[0].dtype, dtype)
    if len(mats) == 1:
        # Contiguous, as a stack is: the norm's sums then run in one order for every layout.
        W = mats[0].to(work_dtype, memory_format=torch.contiguous_format)
        owned = W is not mats[0]
    else:
        W = torch.empty((sum(M.shape[0] for M in mats), m, n), dtype=work_dtype, device=device)
        torch.cat(mats, out=W)
        owned = True
    if device.type == "cuda" or torch.compiler.is_compiling():
        W = _divide_by_max(W, owned)
        norms = torch.linalg.vector_norm(W, dim=(-2, -1), keepdim=True)
    else:
        norms = torch.linalg.vector_norm(W, dim=(-2, -1), keepdim=True)
        unsafe = _unsafe(norms)
        if bool(unsafe.any()):
            W = torch.where(unsafe, _divide_by_max(W, False), W)
            norms = torch.linalg.vector_norm(W, dim=(-2, -1), keepdim=True)
    inv = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    if W.dtype == dtype and owned:
        return W.mul_(inv)
    return torch.mul(W, inv, out=torch.empty(W.shape, dtype=dtype, device=device))


def _unsafe(norms: Tensor) -> Tensor:
    """Where a norm is outside [2⁻⁶⁰, 2⁶⁰] (or NaN), so its matrix is pre-scaled first."""
    lo, hi = _SAFE_NORM
    return ~((norms >= lo) & (norms <= hi))


def _divide_by_max(W: Tensor, in_place: bool) -> Tensor:
    """Each matrix over its largest absolute entry (a zero matrix unchanged; NaN propagates),
    in ``W`` itself where ``in_place``."""
    amax = torch.linalg.vector_norm(W, ord=math.inf, dim=(-2, -1), keepdim=True)
    # A division, not a multiplication by 1/amax: the reciprocal of a subnormal overflows.
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return W.div_(amax) if in_place else W / amax


def _norm_dtype(input_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (input_dtype, compute_dtype) else torch.float32


#: On a CPU, matrices with at least this many elements are multiplied one at a time (see
#: :func:`stacks_well`). Below it stacking won on an AVX-512 CPU (1.06–1.75× at 2¹⁶–2¹⁸
#: elements); from 2¹⁹ up one at a time won or tied on it and on an AVX2 one (bench/NOTES.md).
_CPU_PER_MATRIX_ELEMENTS = 2**19


def stacks_well(device: torch.device, m: int, n: int) -> bool:
    """Whether ``m×n`` matrices on ``device`` are best multiplied stacked, in batched products.

    On a GPU, always (one launch for many matrices). On a CPU only small ones, where the batch
    is the parallelism: a batched product of a few large matrices splits the batch across
    threads, which leaves cores idle when it is small or odd (3 matrices of 512×4608 on 2 cores
    ran at ~80% of the one-at-a-time rate); matrices multiplied one at a time need not be
    copied into a stack either.
    """
    return device.type != "cpu" or m * n < _CPU_PER_MATRIX_ELEMENTS


def _parts(X: Tensor) -> list[slice]:
    """The batch slices of a wide stack ``X`` to multiply together: all of it, or one matrix at
    a time where the matrices do not stack well (:func:`stacks_well`)."""
    batch, m, n = X.shape
    if batch > 1 and not stacks_well(X.device, m, n):
        return [slice(i, i + 1) for i in range(batch)]
    return [slice(None)]


def _polynomial(s: Tensor, b: float, c: float, out: Tensor) -> Tensor:
    """``out = b·s + c·s·s``. A cubic step (``c = 0``) skips the product: PyTorch's bf16
    ``baddbmm`` on CPUs returns neither term with ``alpha=0`` (off by up to 30 on a 64×64
    matrix, torch 2.11 and 2.13), where ``addmm`` and float32 are right."""
    if c == 0.0:
        return torch.mul(s, b, out=out)
    return torch.baddbmm(s, s, s, beta=b, alpha=c, out=out)


def iterate(X: Tensor, table: Sequence[Triple]) -> Tensor:
    """The Newton–Schulz steps on a normalized wide stack ``X`` (``(B, m, n)``, ``m ≤ n``).

    ``X`` is overwritten (its buffer is reused); the products run with preallocated outputs so
    a whole iteration allocates three buffers, not three per step. Matrices that do not stack
    well (:func:`stacks_well`: large ones on a CPU) are multiplied one at a time.
    """
    batch, m, n = X.shape
    A = X.new_empty(batch, m, m)
    P = X.new_empty(batch, m, m)
    Y = torch.empty_like(X)
    # One matrix at a time is the same batched products on batch-of-one slices.
    parts = _parts(X)
    for a, b, c in table:
        for k in parts:
            x, y, s, p = X[k], Y[k], A[k], P[k]
            torch.bmm(x, x.mT, out=s)
            _polynomial(s, b, c, out=p)
            torch.baddbmm(x, p, x, beta=a, alpha=1.0, out=y)
        X, Y = Y, X
    return X


#: ``polar="gram"`` iterates on the Gram matrix only for matrices at least this many times
#: wider than tall (``n ≥ 2m``): below it the Gram form saves no products.
GRAM_MIN_ASPECT = 2

#: The Gram iteration restarts from the rectangular matrix after every this many steps: 2 in
#: bf16 (and float32, float64), 3 in fp16, whose 3 more mantissa bits keep ``R`` and ``Q``
#: accurate for longer (:func:`gram_restart_every`; measured in ``bench/NOTES.md``).
GRAM_RESTART_EVERY = 2
GRAM_RESTART_EVERY_FP16 = 3


def gram_restart_every(dtype: torch.dtype) -> int:
    """Steps between the Gram form's restarts in compute dtype ``dtype``: 3 in fp16, else 2.

    With classic coefficients and one restart after step 3, bf16 put a singular value up to
    0.43 from its float64 image on 7×33 to 64×256 matrices of condition 10³–10⁵ (restarts
    every 2: 0.11, the plain iteration: 0.12); fp16 at most 0.033 (plain: 0.016, every 2:
    0.013). Five steps then cost ``6m²n + 14m³`` instead of ``9m²n + 11m³`` (triangle products
    counted by half)."""
    return GRAM_RESTART_EVERY_FP16 if dtype == torch.float16 else GRAM_RESTART_EVERY


#: The Gram form runs only where ``eps·(|b| + |c|)`` stays below this at every step (``eps`` of
#: the compute dtype): ``P = a·I + b·R + c·R²`` is rounded after its terms cancel, and ``Q``
#: carries that error into the result. bf16 admits ``|b| + |c| ≤ 8`` (classic: 6.8), fp16 64;
#: Polar Express's first step (38.4) diverged in bf16 on a 7×129 matrix (bench/NOTES.md).
GRAM_MAX_ROUNDING = 1 / 16


def uses_gram(m: int, n: int, table: Sequence[Triple], dtype: torch.dtype) -> bool:
    """Whether ``polar="gram"`` iterates a wide ``m×n`` matrix (``m ≤ n``) on its Gram matrix:
    when ``n ≥ GRAM_MIN_ASPECT·m`` and :func:`gram_refusal` has no objection; otherwise it takes
    the plain iteration."""
    return n >= GRAM_MIN_ASPECT * m and gram_refusal(table, dtype) is None


def gram_refusal(table: Sequence[Triple], dtype: torch.dtype) -> str | None:
    """Why the Gram form does not run the steps ``table`` in ``dtype`` (a phrase), or ``None``
    where it does: it needs ``eps·(|b| + |c|) ≤ GRAM_MAX_ROUNDING`` at every step."""
    eps = torch.finfo(dtype).eps
    worst = max(abs(b) + abs(c) for _, b, c in table)
    if eps * worst <= GRAM_MAX_ROUNDING:
        return None
    name = str(dtype).removeprefix("torch.")
    return f"|b| + |c| reaches {worst:.3g}, over {GRAM_MAX_ROUNDING / eps:.3g} in {name}"


def gram_iterate(X: Tensor, table: Sequence[Triple]) -> Tensor:
    """The same steps as :func:`iterate`, computed on the ``m×m`` Gram matrix (Gram
    Newton–Schulz) for a normalized wide stack ``X`` (``(B, m, n)``, ``m ≤ n``).

    A step ``X ← a·X + (b·A + c·A²)·X`` with ``A = X·Xᵀ`` is ``X ← P·X`` with
    ``P = a·I + b·R + c·R²`` a polynomial of ``R = X·Xᵀ``, so ``k`` steps are
    ``X_k = Q·X_0`` with ``Q = P_1·…·P_k`` and ``R ← P·R·P``::

        R ← X·Xᵀ;  Q ← I
        for (a, b, c) in coefficients:
            P ← a·I + b·R + c·R²;  Q ← Q·P;  R ← P·R·P
            every k steps:  X ← Q·X;  R ← X·Xᵀ;  Q ← I     (k: gram_restart_every)
        X ← Q·X

    Equal to :func:`iterate` in exact arithmetic. A step multiplies ``m×m`` matrices only, one
    to three (``R²``, then ``Q·P`` or the two of ``P·R·P``; ``2m³`` flops each, against
    ``4m²n + 2m³`` for a plain step); ``R`` and the result cost ``2m²n`` each, a restart
    ``4m²n``. Five steps at ``n = 4m`` with ``k = 2``: ``70m³`` against ``90m³``.
    ``R`` holds the squares of the singular values, so in bf16 it loses those below about
    ``0.06·σ_max`` until a restart recomputes it from ``X``: the restarts keep the result's
    error against the polar factor at the plain iteration's; against float64 Newton–Schulz it
    is a few times the plain iteration's (``bench/NOTES.md``). ``X`` is overwritten; the
    result may be in another buffer.
    """
    batch, m, _ = X.shape
    every = gram_restart_every(X.dtype)
    R, P, Q, T = (X.new_empty(batch, m, m) for _ in range(4))
    Y = torch.empty_like(X)
    last = len(table) - 1
    for k in _parts(X):
        x, y, r, p, q, t = X[k], Y[k], R[k], P[k], Q[k], T[k]
        torch.bmm(x, x.mT, out=r)
        fresh = True  # Q = I
        for i, (a, b, c) in enumerate(table):
            _polynomial(r, b, c, out=p)
            p.diagonal(dim1=-2, dim2=-1).add_(a)
            if fresh:
                q.copy_(p)
            else:
                torch.bmm(q, p, out=t)
                q, t = t, q
            fresh = False
            if i == last:
                break
            if (i + 1) % every == 0:
                torch.bmm(q, x, out=y)
                x, y = y, x
                torch.bmm(x, x.mT, out=r)
                fresh = True
            else:
                torch.bmm(r, p, out=t)
                torch.bmm(p, t, out=r)
        torch.bmm(q, x, out=y)
    # Every part restarts as often, so every result is in the same buffer.
    return X if ((len(table) - 1) // every) % 2 else Y


def newton_schulz(
    G: Tensor,
    coefficients: str | Sequence[Sequence[float]] = "classic",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    gram: bool = False,
) -> Tensor:
    """Approximate ``polar(G) = U·Vᵀ`` of every matrix in ``G`` (shape ``(..., m, n)``).

    Per matrix, with the matrix oriented so that ``m ≤ n`` (tall ones are transposed and the
    result transposed back)::

        X ← G / ‖G‖_F                      (norm in float32, zero-safe: zero gives zero)
        for (a, b, c) in coefficients:     (operands in ``dtype``, products accumulate in fp32)
            A ← X·Xᵀ;  B ← b·A + c·A·A;  X ← a·X + B·X

    ``dtype`` ``None`` (the default) is :func:`default_compute_dtype` of ``G``'s device: bf16,
    or float32 on a CPU without bf16 matrix instructions. Leading dimensions are a batch: each
    matrix is orthogonalized on its own, all of them with batched matrix products. Returns a
    tensor of ``G``'s shape in that dtype. Non-finite input gives non-finite output.

    A preset named in :data:`PRECONDITIONED` (``"turbo_muon"``) starts from the rescaled
    ``X`` (:func:`aol_`) instead.

    ``gram=True`` computes the same steps on the Gram matrix (:func:`gram_iterate`) for
    matrices with ``n ≥ 2m`` (:func:`uses_gram`), in fewer flops and with a larger error
    against float64 Newton–Schulz; squarer matrices, and coefficients whose terms cancel too
    much for ``dtype`` (:func:`gram_refusal`: Polar Express in bf16), take the plain
    iteration.
    """
    check_matrices(G, "newton_schulz")
    if dtype is None:
        dtype = default_compute_dtype(G.device)
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            f"Newton–Schulz compute dtype must be one of {_COMPUTE_DTYPES}; got {dtype}"
        )
    table = resolve_coefficients(coefficients, steps)
    tall = orient(*G.shape[-2:])[2]
    X = G.mT if tall else G
    batch_shape, (m, n) = X.shape[:-2], X.shape[-2:]
    if X.numel() == 0:
        return torch.zeros(G.shape, dtype=dtype, device=G.device)
    aol = preconditioning(coefficients) == "aol"
    steps_of = gram_iterate if gram and not aol and uses_gram(m, n, table, dtype) else iterate
    X = normalized_stack([X.reshape(-1, m, n)], dtype)
    X = steps_of(aol_(X) if aol else X, table)
    X = X.reshape(*batch_shape, m, n)
    return X.mT if tall else X


def polar_svd(G: Tensor) -> Tensor:
    """The exact polar factor ``U·Vᵀ`` of every matrix in ``G``, from a float64 thin SVD.

    Directions whose singular value is zero (below ``max(m, n)·ε₆₄·σ_max``) are dropped, so a
    zero or rank-deficient matrix maps to the partial isometry Newton–Schulz converges to, never
    to an arbitrary basis. Returns float64 of ``G``'s shape.
    """
    check_matrices(G, "polar_svd")
    Gd = G.to(torch.float64)
    if Gd.numel() == 0:
        return torch.zeros_like(Gd)
    U, S, Vh = torch.linalg.svd(Gd, full_matrices=False)
    tol = S.amax(dim=-1, keepdim=True) * max(G.shape[-2:]) * torch.finfo(torch.float64).eps
    keep = (S > tol).to(torch.float64)
    return (U * keep.unsqueeze(-2)) @ Vh
