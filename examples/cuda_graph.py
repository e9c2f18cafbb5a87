"""A whole training step (forward, backward and ``Scion.step()``) captured in one CUDA graph.

    python examples/cuda_graph.py [--steps 200] [--backend auto]

The recipe is torch's for its capturable optimizers (``torch.cuda.graphs``, "whole network
capture"), with one Scion-specific line:

1. ``Scion(..., capturable=True, nonfinite="ignore")`` with ``lr`` a one-element tensor on the
   GPU; a scheduler writes it in place, and every replay reads it.
2. Static input and target tensors; each real batch is copied into them.
3. Warm-up steps on a side stream: they make the gradients, the averaging buffers and the
   fused kernels' address tables.
4. The capture zeroes the gradients in place (``zero_grad(set_to_none=False)``) instead of
   freeing them: the kernels' tables hold their addresses, made in the warm-up. (With the
   reference backend, ``set_to_none=True`` before the capture works as well.)
5. ``graph.replay()`` per batch, then ``scheduler.step()``.

A replay runs the same kernels as an eager step, with no Python in between: on a GPU it steps
as the eager loop does (``tests/test_backends.py::test_whole_training_step_replays``), faster
where the step is bound by the host. Needs a CUDA GPU; elsewhere it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from scion_kernels import Scion, param_groups


def capture_training_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    warmup: int = 3,
) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Capture ``loss_fn(model(x), y)``, its backward and ``opt.step()`` in one CUDA graph,
    after ``warmup`` eager steps on a side stream (they train the model too). Returns the graph
    and the loss tensor each replay writes; copy a batch into ``x`` and ``y`` before each
    ``graph.replay()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=False)
            loss_fn(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)  # the gradients keep their memory: tables name it
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return graph, loss


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_graph.py needs a CUDA GPU: CUDA graphs are captured on one", file=sys.stderr)
        return None

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
    ).cuda()  # fmt: skip
    lr = torch.tensor(0.02, device="cuda")
    opt = Scion(param_groups(model, "mlp"), lr=lr, momentum=0.1, backend=args.backend,
                capturable=True, nonfinite="ignore")  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / (args.steps + 3))
    static_x = torch.randn(128, 256, device="cuda")
    static_y = torch.randint(0, 10, (128,), device="cuda")
    teacher = torch.randn(256, 10, device="cuda")

    graph, loss = capture_training_step(model, opt, nn.functional.cross_entropy, static_x, static_y)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = torch.randn(128, 256, device="cuda")
        static_x.copy_(batch)
        static_y.copy_((batch @ teacher).argmax(1))
        graph.replay()
        sched.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"{args.steps} replayed steps in {seconds:.3f} s; last loss {loss.item():.4f}; "
          f"lr now {lr.item():.4g}")  # fmt: skip
    return loss.item()


if __name__ == "__main__":
    main()
