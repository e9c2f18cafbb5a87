"""Train a small character-level GPT with Scion and with AdamW and compare the losses.

The text is Python's own standard library source (``inspect``, ``argparse``, ``textwrap``,
...), so nothing is downloaded. About a minute on a 2-core CPU::

    python examples/quickstart.py [--steps 300]

The model, data and training loop come from ``scion_kernels.demo``; ``python -m
scion_kernels.demo`` runs the fuller comparison (with unconstrained Scion and Muon).
"""

from __future__ import annotations

import argparse

import torch

from scion_kernels import Scion, format_groups, param_groups
from scion_kernels.demo import GPT_RADII, TinyGPT, char_data, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data, val, vocab = char_data()
    print(
        f"Character-level GPT on {len(data):,} training characters of Python's standard "
        f"library (vocabulary {vocab}), {args.steps} steps of {args.batch}×{args.ctx} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    # Learning rates: the best of a sweep at 300 steps on this setup (bench/NOTES.md):
    # Scion {0.005, 0.01, 0.02, 0.05, 0.1, 0.2}, AdamW {1e-3, 3e-3, 1e-2, 2e-2}.
    def scion(model):
        groups = param_groups(model, "gpt", overrides=GPT_RADII)
        print("\nScion parameter groups (recipe 'gpt' with shallow-nanogpt radii):")
        print(format_groups(groups))
        opt = Scion(groups, lr=0.02, momentum=0.1)
        opt.init()
        return opt

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    results = {}
    for name, make in (("Scion", scion), ("AdamW", adamw)):
        print(f"\nTraining with {name}")
        torch.manual_seed(0)
        model = TinyGPT(vocab, ctx=args.ctx)
        opt = make(model)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]

        def report(step: int, loss: float, name: str = name) -> None:
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                print(f"  {name:6s} step {step:4d}  train loss {loss:.3f}", flush=True)

        results[name] = train(name, model, opt, data, val, steps=args.steps, batch=args.batch,
                              ctx=args.ctx, on_step=report)  # fmt: skip

    print(f"\n{'optimizer':10s} {'train loss':>10} {'val loss':>9} {'ms/step':>8}")
    for name, run in results.items():
        print(f"{name:10s} {run.losses[-1][1]:10.3f} {run.val_loss:9.3f} {run.ms_per_step:8.1f}")


if __name__ == "__main__":
    main()
