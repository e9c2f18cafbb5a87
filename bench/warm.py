"""Compile the Triton kernels a GPU check measures, before it measures them:
``python -m bench.warm kernels|polar|step``.

Each target runs its workload once, so that Triton compiles every variant it launches into its
on-disk cache (``~/.triton/cache``, shared by processes); the GPU check runs the targets as
separate processes at the same time, so their compilations overlap, and its timed runs load
the compiled kernels instead of compiling them. Prints one line: the target and its seconds
(the cold compilation time, since nothing else runs long here).

- ``kernels``: the three products at ``bench.kernels.CHECK_SHAPES`` (their default tiles);
- ``polar``: the Triton polar factor at 4096² (prologue, scales, normalize, products);
- ``step``: one Scion and one ScionLight step on GPT-2 small (``backend="triton"``: the fused
  update, the grouped kernel, the one-program kernel where a bucket fits).
"""

from __future__ import annotations

import sys
import time

import torch

TARGETS = ("kernels", "polar", "step")


def warm(target: str, device: torch.device) -> None:
    from . import kernels
    from .common import Context

    ctx = Context(device=device, quick=False, suite="check", log=lambda s: None)
    if target == "kernels":
        kernels.run(ctx, warm_only=True)
    elif target == "polar":
        from scion_kernels import resolve_coefficients
        from scion_kernels.backends.triton.newton_schulz import polar

        side = 4096 if device.type == "cuda" else 64
        polar(torch.randn(side, side, device=device), resolve_coefficients("classic", 5))
    elif target == "step":
        import scion_kernels

        from .models import GPT2
        from .step import SEED

        torch.manual_seed(SEED)
        with device:
            model = GPT2(n_layer=12) if device.type == "cuda" else GPT2(1, dim=64, vocab=256)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for cls in (scion_kernels.Scion, scion_kernels.ScionLight):
            groups = scion_kernels.param_groups(model, "gpt")
            cls(groups, lr=2**-6, momentum=0.1, backend="triton").step()
    else:
        raise SystemExit(f"unknown target {target!r}; targets are {TARGETS}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in TARGETS:
        print(f"usage: python -m bench.warm {{{'|'.join(TARGETS)}}}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        print(f"warm {args[0]}: skipped, Triton is not importable ({err})", flush=True)
        return 0
    t0 = time.perf_counter()
    warm(args[0], device)
    print(f"warm {args[0]}: {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
