"""A small character-level GPT on text that ships with Python, and the optimizers to compare.

The building blocks of ``python -m scion_kernels.demo`` (see ``__main__.py``) and of the
examples: the data (the standard library's own sources, nothing downloaded), the model, the
optimizers as the comparison sets them up, and one training loop.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import Scion, param_groups

__all__ = [
    "GPT_RADII",
    "OPTIMIZERS",
    "Run",
    "TinyGPT",
    "batches",
    "char_data",
    "make_optimizer",
    "stdlib_text",
    "train",
]


def stdlib_text() -> str:
    """The sources of a few standard-library modules (about 400k characters)."""
    import argparse
    import inspect
    import textwrap
    import typing

    return "\n".join(inspect.getsource(m) for m in (argparse, inspect, textwrap, typing))


def char_data(text: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``text`` (default :func:`stdlib_text`) as character ids: the first 90% for training,
    the rest for validation, and the vocabulary size."""
    text = stdlib_text() if text is None else text
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    return data[:split], data[split:], len(chars)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        # √2·GELU keeps the activation variance, as the authors recommend with Scion.
        return x + self.out(math.sqrt(2) * F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-shaped model: token and position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def batches(
    data: torch.Tensor, steps: int, batch: int, ctx: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random batches of ``batch`` windows of ``ctx`` characters and their next
    characters, the same for a given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[j : j + ctx] for j in i.tolist()])
        y = torch.stack([data[j + 1 : j + ctx + 1] for j in i.tolist()])
        yield x, y


# ---------------------------------------------------------------------------------- optimizers
# The radii of the authors' shallow-nanogpt example for a small GPT; the GPT recipe's defaults
# (hidden 50, head 3000) are for GPT-2-sized widths.
GPT_RADII = {"hidden": {"scale": 3.0}, "vector": {"scale": 1.0}, "head": {"scale": 10.0}}


class _Chained:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _scion(model: nn.Module, lr: float, backend: str, unconstrained: bool) -> Any:
    opt = Scion(
        param_groups(model, "gpt", overrides=GPT_RADII),
        lr=lr,
        momentum=0.1,
        unconstrained=unconstrained,
        backend=backend,
    )
    opt.init()  # weights on the sphere of radius ρ, as the authors start them
    return opt


def _adamw(model: nn.Module, lr: float, backend: str) -> Any:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def _muon(model: nn.Module, lr: float, backend: str) -> Any:
    """torch.optim.Muon on the blocks' matrices (its learning rate scaled to match AdamW's
    update RMS), AdamW at ``lr / 10`` on embeddings, head and vectors."""
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon(
        hidden, lr=lr, momentum=0.95, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    adamw = torch.optim.AdamW(rest, lr=lr / 10, betas=(0.9, 0.95), weight_decay=0.1)
    return _Chained(muon, adamw)


@dataclass(frozen=True)
class OptimizerSpec:
    """How the demo builds one optimizer, and its learning rate for the default model (the
    best of a sweep, bench/NOTES.md)."""

    label: str
    build: Callable[[nn.Module, float, str], Any]
    lr: float


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "scion": OptimizerSpec(
        "Scion (constrained)", lambda m, lr, b: _scion(m, lr, b, unconstrained=False), 0.01
    ),
    "uscion": OptimizerSpec(
        "Scion (unconstrained)", lambda m, lr, b: _scion(m, lr, b, unconstrained=True), 0.01
    ),
    "adamw": OptimizerSpec("AdamW", _adamw, 0.012),
    "muon": OptimizerSpec("Muon + AdamW", _muon, 0.02),
}


def make_optimizer(name: str, model: nn.Module, lr: float | None = None, backend: str = "auto"):
    """The optimizer ``name`` (a key of :data:`OPTIMIZERS`) for ``model``; every param group
    remembers its starting learning rate as ``"initial_lr"`` for the schedule."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon")
    spec = OPTIMIZERS[name]
    opt = spec.build(model, spec.lr if lr is None else lr, backend)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


# ----------------------------------------------------------------------------------- training
@dataclass
class Run:
    """What one training run measured."""

    name: str
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    val_loss: float = math.nan
    ms_per_step: float = math.nan
    diverged: bool = False

    @property
    def train_loss(self) -> float:
        """The mean of the last 10% of recorded training losses."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return statistics.mean(loss for _, loss in tail) if tail else math.nan


def train(
    name: str,
    model: nn.Module,
    opt: Any,
    data: torch.Tensor,
    val: torch.Tensor,
    *,
    steps: int,
    batch: int,
    ctx: int,
    device: torch.device | str = "cpu",
    val_batches: int = 20,
    on_step: Callable[[int, float], None] | None = None,
) -> Run:
    """Train ``steps`` steps with a linear warm-down of every group's ``initial_lr`` over the
    last 40% (as the authors' nanoGPT runs); ``on_step(step, loss)`` after each step. Stops
    early, marking the run diverged, if the loss is not finite."""
    run = Run(name)
    model.to(device).train()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches(data, steps, batch, ctx, seed=1)):
        frac = min(1.0, (steps - step) / (0.4 * steps))
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * frac
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        run.losses.append((step, value))
        if on_step is not None:
            on_step(step, value)
        if not math.isfinite(value):
            run.diverged = True
            break
    run.ms_per_step = 1e3 * (time.perf_counter() - t0) / max(1, len(run.losses))
    model.eval()
    with torch.no_grad():
        run.val_loss = statistics.mean(
            F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten()).item()
            for x, y in batches(val, val_batches, batch, ctx, seed=2)
        )
    return run
