"""Host cost of an optimizer step against ``torch.optim.AdamW(foreach=True)``.

GPT-2 small's tensor structure (148 tensors, 12 blocks) with tiny dimensions (width 8, vocab 16,
context 8), so that what a step costs is its Python and its small ops, not arithmetic: on a
GPU that is the time the host takes before the device can run anything. Medians over
``--steps`` steps after warm-up, with fixed random gradients; the rows alternate so that a
drifting machine weighs on all of them alike.

    python -m bench.host_cost [--steps 300] [--rounds 3] [--compile]

Rows: AdamW (foreach), and Scion's reference step (``backend="torch"``, the GPT-2 recipe's
groups, ``nonfinite="ignore"``) with bf16 and with float32 Newton–Schulz (tiny bf16 products
cost 3× more than float32 ones on a CPU). ``--compile`` adds both optimizers compiled as torch
documents (``torch.compile`` of a function calling ``opt.step()``, a tensor ``lr``); compiling
takes about a minute each on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import scion_kernels as sk
from scion_kernels.newton_schulz import describe_device

from .models import GPT2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT2(n_layer=12, dim=8, vocab=16, context=8)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _scion(ns_dtype: torch.dtype, lr: float | torch.Tensor = 2**-7) -> Callable[[], object]:
    groups = sk.param_groups(_model(), "gpt")
    for g in groups:
        if g["norm"] == "Spectral":
            g["norm_kwargs"] = {**g["norm_kwargs"], "ns_dtype": ns_dtype}
    return sk.Scion(groups, lr=lr, momentum=0.1, backend="torch", nonfinite="ignore").step


def steps(compiled: bool) -> dict[str, Callable[[], object]]:
    """The step of every row, by name."""
    out: dict[str, Callable[[], object]] = {
        "AdamW (foreach)": torch.optim.AdamW(_model().parameters(), lr=1e-3, foreach=True).step,
        "Scion, bf16 Newton–Schulz": _scion(torch.bfloat16),
        "Scion, float32 Newton–Schulz": _scion(torch.float32),
    }
    if compiled:
        adam = torch.optim.AdamW(_model().parameters(), lr=torch.tensor(1e-3), foreach=False)
        scion = _scion(torch.bfloat16, lr=torch.tensor(2**-7))
        out["AdamW, compiled"] = torch.compile(lambda: adam.step())
        out["Scion, bf16, compiled"] = torch.compile(lambda: scion())
    return out


def measure(rows: dict[str, Callable[[], object]], n_steps: int, rounds: int) -> dict[str, float]:
    """Median milliseconds per step of each row, over ``rounds`` alternating rounds."""
    for step in rows.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds):
        for name in list(rows)[:: 1 if r % 2 == 0 else -1]:
            step = rows[name]
            for _ in range(n_steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    with torch.no_grad():
        medians = measure(steps(args.compile), args.steps, args.rounds)
    n_tensors = sum(1 for _ in _model().parameters())
    print(f"{describe_device('cpu')}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; GPT-2 small's {n_tensors} tensors at width 8\n")  # fmt: skip
    print("| step | median ms | ÷ AdamW (foreach) |")
    print("| --- | --- | --- |")
    base = medians["AdamW (foreach)"]
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3f} | {ms / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
