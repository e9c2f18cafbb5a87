"""A GPT-2-small optimizer step eager and replayed as a CUDA graph (bench ``graph``).

GPT-2 small's parameters (the ``"gpt"`` recipe's groups), fixed random gradients, and for each
candidate its ``step()`` timed eagerly and, on a GPU, captured once in a ``torch.cuda.CUDAGraph``
after three warm-up steps on a side stream (as torch documents for its capturable optimizers)
and replayed. A replay runs the same kernels with no Python at all, so eager minus replayed is
the host's share of the eager step. Candidates:

- ``Scion`` with ``capturable=True`` and a device tensor ``lr``, once per step backend;
- ``AdamW(fused=True, capturable=True)`` with a device tensor ``lr``;
- ``torch.optim.Muon`` on the hidden matrices with fused AdamW on the rest, eager only (Muon has
  no capturable step).

Eager and replayed rows are timed with CUDA events around the call (``Context.time_ms``), so a
host-bound eager step shows its host time. On a CPU there are no CUDA graphs: the eager rows
run on GPT-2 small's tensor structure at width 8 (what ``bench/host_cost.py`` times), to
exercise the plumbing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scion_kernels import RECIPES, Scion, param_groups

from .common import Context
from .models import GPT2
from .step import OUR_BACKENDS, Skip, _spectral_params

MODEL = "gpt2-small"
#: The model's name on a CPU, where it runs at width 8.
TINY_MODEL = "gpt2-small (width 8)"
#: Warm-up steps before a capture (they make the state and the kernels' tables).
WARMUP_STEPS = 3


@dataclass
class Candidate:
    """An optimizer over a model: its name, the backend it runs, its step, and whether the
    step may be captured."""

    optimizer: str
    backend: str
    step: Callable[[], object]
    capturable: bool
    note: str = ""


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    tiny = device.type != "cuda"
    model = (GPT2(dim=8, vocab=16, context=8) if tiny else GPT2()).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _candidates(device: torch.device) -> list[Callable[[nn.Module], Candidate]]:
    recipe = RECIPES["gpt"]
    makers: list[Callable[[nn.Module], Candidate]] = []
    for backend in OUR_BACKENDS:

        def scion(model: nn.Module, backend: str = backend) -> Candidate:
            if backend in ("triton", "cuda") and device.type != "cuda":
                raise Skip(f"the {backend} kernels are timed on CUDA devices only")
            lr = torch.tensor(recipe.lr, device=device)
            try:
                opt = Scion(param_groups(model, "gpt"), lr=lr, momentum=recipe.momentum,
                            backend=backend, nonfinite="ignore", capturable=True)  # fmt: skip
            except ValueError as exc:  # e.g. the native module was not built
                raise Skip(str(exc)) from exc
            return Candidate("Scion", backend, opt.step, True, "capturable=True, device lr")

        makers.append(scion)

    def adamw(model: nn.Module) -> Candidate:
        if device.type != "cuda":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
            return Candidate("AdamW", "torch.optim", opt.step, False, "foreach")
        lr = torch.tensor(1e-3, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
        return Candidate("AdamW", "torch.optim", opt.step, True, "fused, capturable, device lr")

    def muon(model: nn.Module) -> Candidate:
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            raise Skip(f"torch.optim.Muon is not in torch {torch.__version__}")
        matrices = [p for p in _spectral_params(param_groups(model, "gpt")) if p.ndim == 2]
        ids = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if id(p) not in ids]
        m = muon_cls(matrices, lr=recipe.lr)
        a = torch.optim.AdamW(rest, lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))

        def step() -> None:
            m.step()
            a.step()

        return Candidate("Muon+AdamW", "torch.optim", step, False, "no capturable step")

    return [*makers, adamw, muon]


def _captured(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``step`` after ``WARMUP_STEPS`` warm-up calls on a side stream, captured in a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def run(ctx: Context) -> None:
    """Record a ``graph`` row per candidate and mode (eager, replayed) and log the ratios."""
    cuda = ctx.device.type == "cuda"
    if not cuda:
        ctx.log("graph: CUDA graphs need a CUDA device; eager rows only, at width 8")
    for make in _candidates(ctx.device):
        model = _model(ctx.device)
        try:
            cand = make(model)
        except Skip as why:
            ctx.log(f"graph {make.__name__}: skipped ({why})")
            continue
        eager = ctx.time_ms(cand.step)
        modes = {"eager": eager}
        if cuda and cand.capturable:
            graph = _captured(cand.step)
            modes["replayed"] = ctx.time_ms(graph.replay)
            del graph
        for mode, ms in modes.items():
            note = "; ".join(n for n in (cand.note, mode) if n)
            ctx.add(bench="graph", backend=cand.backend, model=MODEL if cuda else TINY_MODEL,
                    optimizer=cand.optimizer, ms=ms, note=note)  # fmt: skip
        line = f"graph {cand.optimizer:<10} {cand.backend:<12} eager {eager:8.3f} ms"
        if "replayed" in modes:
            line += f", replayed {modes['replayed']:8.3f} ms ({eager / modes['replayed']:.2f}×)"
        ctx.log(line)
        del cand, model
        if cuda:
            torch.cuda.empty_cache()
