"""Our reference step against the simplest peers on a CPU, side by side.

``python -m bench.cpu_peers [--rounds 30]``: one step of each optimizer in turn (the order
alternating between rounds, after warm-up rounds) on the 16 hidden matrices of a 3M-parameter
GPT (:class:`bench.models.GPT2` with 4 blocks of width 256: per block 768×256, 256×256,
1024×256 and 256×1024), every optimizer with Spectral updates, the classic coefficients and 5
Newton–Schulz steps:

- ours: ``Scion(norm="Spectral", backend="torch")`` (constrained), Newton–Schulz in the dtype
  chosen for the CPU (bf16 with bf16 matrix instructions, else float32; ``--ns-dtype bf16``
  forces bf16; ``--gram`` adds a column for ours with ``polar="gram"``, the Gram iteration on
  the wide matrices);
- ``pytorch_optimizer.SCION`` with ``LMONorm.SPECTRAL`` (constrained), bf16: a loop over
  parameters;
- ``torch.optim.Muon``, bf16: a loop over parameters.

A shared CPU drifts and other processes slow two-thread products 5–20×: a round is kept only
when other processes used less than 5% of the machine's CPU time while it ran (read from
``/proc/stat``; on systems without it every round is kept). Prints the medians and minimums,
and each peer's median over ours, with the CPU (model, cores, vector unit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from scion_kernels import Scion
from scion_kernels.newton_schulz import default_compute_dtype, describe_device

from .models import GPT2

LR, MOMENTUM, RADIUS = 2**-12, 0.1, 50.0


def hidden_matrices(seed: int = 0) -> list[nn.Parameter]:
    """The GPT's hidden weights (its ``nn.Linear`` weights), each with a fixed gradient."""
    torch.manual_seed(seed)
    model = GPT2(n_layer=4, dim=256, vocab=512, context=64)
    mats = [m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name != "lm_head"]  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    for p in mats:
        p.grad = torch.randn(p.shape, generator=gen)
    return mats


def ours(ns_dtype: torch.dtype | None, polar: str = "newton_schulz") -> Scion:
    """Our reference step on the hidden matrices, Spectral with ``polar``."""
    group = {"params": hidden_matrices(), "norm": "Spectral", "scale": RADIUS,
             "norm_kwargs": {"ns_dtype": ns_dtype, "polar": polar}}  # fmt: skip
    return Scion([group], lr=LR, momentum=MOMENTUM, backend="torch")


def optimizers(
    ns_dtype: torch.dtype | None, gram: bool = False
) -> dict[str, torch.optim.Optimizer]:
    """Each optimizer on its own copy of the matrices (a peer that cannot be imported is left
    out, saying why)."""
    out: dict[str, torch.optim.Optimizer] = {"ours": ours(ns_dtype)}
    if gram:
        out['ours, polar="gram"'] = ours(ns_dtype, "gram")
    try:
        from pytorch_optimizer import SCION
        from pytorch_optimizer.optimizer.scion import LMONorm

        group = {"params": hidden_matrices(), "norm_type": LMONorm.SPECTRAL, "norm_kwargs": {},
                 "scale": RADIUS}  # fmt: skip
        out["pytorch_optimizer.SCION"] = SCION([group], lr=LR, momentum=MOMENTUM, constraint=True)
    except ImportError as err:
        print(f"pytorch_optimizer.SCION skipped: {err}", file=sys.stderr)
    if hasattr(torch.optim, "Muon"):
        out["torch.optim.Muon"] = torch.optim.Muon(hidden_matrices(), lr=LR)
    return out


def _cpu_times() -> tuple[int, int, int] | None:
    """(all, idle, this process's) CPU ticks so far, or ``None`` without ``/proc``."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        with open(f"/proc/{os.getpid()}/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(ticks), ticks[3] + ticks[4], int(mine[11]) + int(mine[12])


def interleaved(
    steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 3, max_other: float = 0.05
) -> tuple[dict[str, list[float]], int]:
    """Milliseconds per call of each function over ``rounds`` kept rounds, and the number of
    rounds dropped because other processes were busy."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    kept = dropped = 0
    while kept < rounds and dropped < 6 * rounds:
        order = names if (kept + dropped) % 2 == 0 else names[::-1]
        before, this = _cpu_times(), {}
        for name in order:
            start = time.perf_counter()
            steps[name]()
            this[name] = (time.perf_counter() - start) * 1e3
        after = _cpu_times()
        if before is not None and after is not None:
            total = max(after[0] - before[0], 1)
            other = (total - (after[1] - before[1]) - (after[2] - before[2])) / total
            if other >= max_other:
                dropped += 1
                time.sleep(1.0)
                continue
        kept += 1
        for name in names:
            times[name].append(this[name])
    return times, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ns-dtype", choices=("auto", "bf16"), default="auto")
    parser.add_argument("--gram", action="store_true", help='also ours with polar="gram"')
    args = parser.parse_args(argv)
    opts = optimizers(torch.bfloat16 if args.ns_dtype == "bf16" else None, args.gram)
    with torch.no_grad():
        times, dropped = interleaved({k: o.step for k, o in opts.items()}, args.rounds)
    ours_ms = statistics.median(times["ours"])
    dtype = default_compute_dtype("cpu") if args.ns_dtype == "auto" else torch.bfloat16
    print(f"{describe_device('cpu')}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; ours in {str(dtype).removeprefix('torch.')}; {len(times['ours'])} rounds "
          f"kept, {dropped} dropped (other processes busy)\n")  # fmt: skip
    print("| step of the 16 matrices | median ms | min ms | ours / it (medians) |", end="")
    print(" ours with gram / it |" if args.gram else "")
    print("| --- | --- | --- | --- |" + (" --- |" if args.gram else ""))
    gram = statistics.median(times['ours, polar="gram"']) if args.gram else None
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| {name} | {median:.1f} | {min(ts):.1f} | {ours_ms / median:.2f} |", end="")
        print(f" {gram / median:.2f} |" if gram is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
