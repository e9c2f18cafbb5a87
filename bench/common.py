"""What every benchmark shares: the run context, timing, FLOP counts, the result schema.

Timing follows docs/performance.md: on CUDA, ``triton.testing.do_bench`` medians (CUDA events,
warm-up excluded) or CUDA events when Triton is missing; on a CPU, ``time.perf_counter``
medians over repeats after one warm-up call. Callers rotate inputs larger than the L2 cache and
never time on zeros.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scion_kernels.newton_schulz import cpu_has_bf16_matmul, describe_device

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: Row keys every row has, and the optional ones (the JSON schema of bench/results).
REQUIRED_KEYS = ("bench", "backend", "ms")
OPTIONAL_KEYS = (
    "shape",  # [batch, m, n] for "polar"
    "model",  # "gpt2-small", "vit-s16", "resnet18" for "step"; a layout for "init"
    "optimizer",  # "Scion", "ScionLight", "Muon+AdamW", ...
    "coefficients",
    "dtype",
    "tflops",
    "ceiling_fraction",
    "gbps",
    "state_bytes",
    "rel_err",
    "sv_min",
    "sv_max",
    "numel",
    "kernel",  # "gram", "poly", "apply" for "kernels"
    "config",  # a kernel's tile configuration, where several are timed (bench/tiles.py)
    "peak_bytes",  # for "step" on a GPU: peak allocated memory beyond parameters and gradients
    "first_s",  # seconds of the first call (compilation included), where it was timed
    "draws",  # "independent" or "shared" for "init"
    "touch_s",  # for "init": seconds of a first zero_() pass over freshly materialized memory
    "note",
)
BENCHES = ("kernels", "polar", "step", "graph", "elementwise", "init")


def device_name(device: torch.device) -> str:
    """The name PyTorch reports for a GPU, or the CPU model with its vector unit."""
    return describe_device(device)


def device_slug(name: str) -> str:
    """A folder name for a device: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """The full hash of HEAD, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """The header of a results file: device, commit, date and software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


#: A quick run skips any configuration whose timed calls are predicted (from its FLOPs and
#: the matrix rate of its dtype measured in the run) to take longer than this, in seconds.
QUICK_BUDGET_S = 12.0


@dataclass
class Context:
    """One run's settings, shared by every benchmark module."""

    device: torch.device
    quick: bool = True
    repeats: int = 5
    #: ``"quick"``, ``"full"`` or ``"check"`` (the GPU check's sized suite, ``quick=False``;
    #: on a CPU it shrinks to plumbing sizes: :attr:`tiny`).
    suite: str = "quick"
    log: Callable[[str], None] = print
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: Matrix rates (TFLOP/s) measured in this run, by dtype name (:meth:`matrix_rate`).
    rates: dict[str, float] = field(default_factory=dict)
    #: When set, every row is also appended to this file as one JSON line the moment it is
    #: recorded, so a run that is killed still leaves what it measured.
    progress: Path | None = None

    @property
    def tiny(self) -> bool:
        """A check suite on a CPU: every benchmark at sizes that only exercise its plumbing."""
        return self.suite == "check" and self.device.type == "cpu"

    def matrix_rate(self, dtype: torch.dtype) -> float:
        """The measured matrix rate of ``dtype`` products on this device (TFLOP/s), measured
        on first use and kept for the run."""
        key = str(dtype).removeprefix("torch.")
        if key not in self.rates:
            self.rates[key] = matmul_ceiling_tflops(self, dtype=dtype)
        return self.rates[key]

    def too_slow(self, flops: float, dtype: torch.dtype, calls: int) -> str | None:
        """Why ``calls`` calls of ``flops`` each in ``dtype`` do not fit a quick run, or
        ``None`` (always ``None`` outside quick runs)."""
        if not self.quick:
            return None
        rate = self.matrix_rate(dtype)
        seconds = calls * flops / (rate * 1e12)
        if seconds <= QUICK_BUDGET_S:
            return None
        name = str(dtype).removeprefix("torch.")
        return (
            f"predicted {seconds:.0f} s for {calls} calls at the {name} matrix rate measured "
            f"here ({rate * 1e3:.3g} GFLOP/s), over the quick run's {QUICK_BUDGET_S:.0f} s"
        )

    def add(self, **row: Any) -> dict[str, Any]:
        """Validate and record one result row; returns it."""
        missing = [k for k in REQUIRED_KEYS if k not in row]
        unknown = [k for k in row if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
        if missing or unknown:
            raise ValueError(f"bad result row {row}: missing {missing}, unknown {unknown}")
        if row["bench"] not in BENCHES:
            raise ValueError(f"unknown bench {row['bench']!r}")
        if ("shape" in row) == ("model" in row):
            raise ValueError(f"a row has exactly one of shape and model: {row}")
        self.rows.append(row)
        if self.progress is not None:
            with self.progress.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(
        self, fn: Callable[[], Any], repeats: int | None = None, warmup: bool = True
    ) -> float:
        """Median wall time of ``fn()`` in milliseconds, warm-up excluded."""
        return median_ms(fn, self.device, repeats or self.repeats, warmup)


def median_ms(
    fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: bool = True
) -> float:
    """Median time of ``fn()`` in ms: CUDA events (via do_bench when Triton is installed) on a
    GPU, ``time.perf_counter`` on a CPU; one untimed warm-up call first (on a CPU, unless
    ``warmup`` is false: the caller has warmed ``fn`` up)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(max(repeats, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def newton_schulz_flops(m: int, n: int, steps: int = 5, batch: int = 1) -> float:
    """Dense FLOPs of ``steps`` Newton–Schulz steps (docs/math.md §4): ``4m²n + 2m³`` per step,
    with ``m ≤ n`` after orienting the matrix wide."""
    m, n = min(m, n), max(m, n)
    return float(batch) * steps * (4.0 * m * m * n + 2.0 * m**3)


def matmul_ceiling_tflops(
    ctx: Context, n: int | None = None, dtype: torch.dtype = torch.bfloat16
) -> float:
    """The matrix rate of ``dtype`` measured now: an n×n×n product on random data into a
    preallocated output, as Newton–Schulz multiplies (TFLOP/s). On a GPU the median time; on
    a CPU, whose rate drifts by ±10% from second to second on a shared machine, the fastest
    of 20 calls (3 for bf16 without bf16 matrix instructions, measured at 512: 1024³ takes
    seconds there), so that it is the ceiling it is used as."""
    slow = ctx.device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16_matmul()
    if n is None:
        n = 8192 if ctx.device.type == "cuda" else (512 if slow else 1024)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    c = torch.empty(n, n, device=ctx.device, dtype=dtype)
    if ctx.device.type == "cuda":
        ms = ctx.time_ms(lambda: torch.mm(a, b, out=c))
    else:
        torch.mm(a, b, out=c)
        ms = min(median_ms(lambda: torch.mm(a, b, out=c), ctx.device, 1, warmup=False)
                 for _ in range(3 if slow else 20))  # fmt: skip
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbps(ctx: Context, numel: int | None = None) -> float:
    """Device copy bandwidth measured now, counting bytes read and written (GB/s)."""
    numel = numel or ((1 << 28) if ctx.device.type == "cuda" else (1 << 25))
    src = torch.randn(numel, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src))
    return 2.0 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def format_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` over ``columns`` (missing values left blank)."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "×".join(str(x) for x in v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
