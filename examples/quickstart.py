"""Train a small character-level GPT with Scion and with AdamW and compare the losses.

The text is Python's own standard library source (``inspect``, ``argparse``, ``textwrap``,
...), so nothing is downloaded. About a minute on a 2-core CPU::

    python examples/quickstart.py [--steps 300]
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from scion_kernels import Scion, format_groups, param_groups


def stdlib_text() -> str:
    import argparse as a
    import inspect as i
    import textwrap as t
    import typing as ty

    return "\n".join(inspect.getsource(m) for m in (a, i, t, ty))


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


def batches(data: torch.Tensor, steps: int, batch: int, ctx: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[j : j + ctx] for j in i.tolist()])
        y = torch.stack([data[j + 1 : j + ctx + 1] for j in i.tolist()])
        yield x, y


def train(name: str, make_opt, data, val, vocab, args) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = TinyGPT(vocab, ctx=args.ctx)
    opt, lr0 = make_opt(model)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches(data, args.steps, args.batch, args.ctx, seed=1)):
        # Linear warm-down over the last 40% of the run, as the authors' nanoGPT runs.
        frac = min(1.0, (args.steps - step) / (0.4 * args.steps))
        for g in opt.param_groups:
            g["lr"] = lr0 * frac
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  {name:6s} step {step:4d}  train loss {loss.item():.3f}", flush=True)
    elapsed = (time.perf_counter() - t0) / args.steps
    with torch.no_grad():
        vl = statistics.mean(
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
            for x, y in batches(val, 20, args.batch, args.ctx, seed=2)
        )
    return loss.item(), vl, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    text = stdlib_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    vocab = len(chars)
    print(
        f"Character-level GPT on {len(text):,} characters of Python's standard library "
        f"(vocabulary {vocab}), {args.steps} steps of {args.batch}×{args.ctx} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    # Learning rates: the best of a sweep at 300 steps on this setup (bench/NOTES.md):
    # Scion {0.005, 0.01, 0.02, 0.05, 0.1, 0.2}, AdamW {1e-3, 3e-3, 1e-2, 2e-2}.
    def scion(model):
        groups = param_groups(
            model,
            "gpt",
            overrides={"hidden": {"scale": 3.0}, "vector": {"scale": 1.0}, "head": {"scale": 10.0}},
        )
        print("\nScion parameter groups (recipe 'gpt' with shallow-nanogpt radii):")
        print(format_groups(groups))
        opt = Scion(groups, lr=0.02, momentum=0.1)
        opt.init()
        return opt, 0.02

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), 1e-2

    results = {}
    for name, make in (("Scion", scion), ("AdamW", adamw)):
        print(f"\nTraining with {name}")
        results[name] = train(name, make, train_data, val_data, vocab, args)

    print(f"\n{'optimizer':10s} {'train loss':>10} {'val loss':>9} {'ms/step':>8}")
    for name, (tl, vl, sec) in results.items():
        print(f"{name:10s} {tl:10.3f} {vl:9.3f} {1e3 * sec:8.1f}")


if __name__ == "__main__":
    main()
