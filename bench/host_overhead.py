"""Host time of one ``backend="triton"`` (or ``"cuda"``) Scion step over GPT-2 small, with the
kernel launches left out: what the Python side (grouping, bucketing, op calls, tables, the
small PyTorch ops between launches) costs before the GPU does any work.

The kernels are replaced by no-ops and the tile choice is the GPU's (not the interpreter's), so
this runs on a CPU; every other line of the step runs as on a GPU. On a GPU each launch adds
its own CPU cost (a few µs) on top; the count of launches is printed too. With
``--backend cuda`` the native module's two entry points are what is left out (each enqueues
several launches from C++), and one kept buffer stands in for the workspace the caching
allocator hands out on a GPU.

    python -m bench.host_overhead [--backend triton|cuda] [--layers 12] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the optimizer accept CPU tensors

import torch  # noqa: E402


class _Launches:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` only counts."""

    count = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Launches.count += 1

        return launch


def _stub_native() -> Any:
    """A native backend whose module counts its entry points instead of running them (CPU
    tensors accepted)."""
    from scion_kernels.backends import NativeBackend
    from scion_kernels.backends.cuda import native

    real = native.import_native()
    kept: dict[torch.device, torch.Tensor] = {}

    class Stub:
        EMULATED = True

        @staticmethod
        def ns_workspace_bytes(*args: int) -> int:  # the real module's answer, arguments as given
            return 1 << 20 if real is None else real.ns_workspace_bytes(*args)

        @staticmethod
        def ns_step(*args) -> None:
            _Launches.count += 1

        @staticmethod
        def grouped_step(*args) -> None:
            _Launches.count += 1

    def workspace(nbytes: int, device: torch.device) -> tuple[torch.Tensor, int]:
        buf = kept.get(device)
        if buf is None or buf.numel() < nbytes + 256:
            buf = kept[device] = torch.empty(nbytes + 256, dtype=torch.uint8, device=device)
        return buf, -(-buf.data_ptr() // 256) * 256

    native._workspace = workspace
    return NativeBackend(module=Stub())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--nonfinite", default="ignore",
        help="the optimizer's policy; 'raise' adds the gradient screen, a real pass over every "
        "gradient (on a CPU here: arithmetic; on a GPU: a launch and a host sync)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from scion_kernels import backends
    from scion_kernels.backends.triton import POLICIES, TritonBackend, grouped
    from scion_kernels.backends.triton import newton_schulz as kns

    for module in (kns, grouped):
        module.interpreting = lambda: False  # flags as on a GPU
        for name in [n for n in vars(module) if n.endswith("_kernel")]:  # every launch
            setattr(module, name, _Launches())
    if args.backend == "cuda":
        backend = _stub_native()
    else:  # the GPU's tile choice on CPU tensors, never autotuned
        gpu = POLICIES[min(POLICIES)]
        backend = TritonBackend(interpreter=gpu).with_policy(autotune=False)
    with backends.using(backend):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import scion_kernels as sk

    from .models import GPT2

    torch.manual_seed(0)
    model = GPT2(n_layer=args.layers)
    recipe = sk.RECIPES["gpt"]
    opt = sk.Scion(sk.param_groups(model, "gpt"), lr=recipe.lr, momentum=recipe.momentum,
                   backend=args.backend, nonfinite=args.nonfinite)  # fmt: skip
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    times = []
    for step in range(args.steps + 1):
        _Launches.count = 0
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        if step == 0:
            first = times.pop()
    n_params = sum(1 for _ in model.parameters())
    print(f"GPT-2 small, {args.layers} blocks, {n_params} parameter tensors, "
          f"nonfinite={args.nonfinite!r}")  # fmt: skip
    what = "native calls" if args.backend == "cuda" else "launches"
    print(f"backend {args.backend!r}; {what} per step: {_Launches.count}")
    print(f"first step (tables built): {first * 1e3:.2f} ms")
    print(f"later steps: median {statistics.median(times) * 1e3:.3f} ms, "
          f"min {min(times) * 1e3:.3f} ms over {len(times)}")  # fmt: skip
    print(f"torch {torch.__version__}; {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
