"""Scion at small scale: what a user runs first, and the paper's central claims checked.

    python -m scion_kernels.demo                 # compare: constrained and unconstrained Scion,
                                                 # AdamW, Muon on a character-level GPT
    python -m scion_kernels.demo lr-transfer     # best learning rate against width, Scion/AdamW
    python -m scion_kernels.demo norms           # ‖W‖₂ against the radius, with and without
                                                 # the constraint

The text is the sources of Python's own standard library (nothing is downloaded). Every
command writes ``<name>.json`` and, with matplotlib installed, ``<name>.png`` to ``--out``
(default ``demo_results``). ``--size cpu`` (default) fits a few minutes on a 2-core CPU;
``--size gpu`` trains a larger model on the GPU, where ``--backend`` chooses Scion's fused
backend (default ``auto``: the one the committed timing table names per shape, see the
README).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..monitor import NormMonitor
from . import OPTIMIZERS, Run, TinyGPT, char_data, make_optimizer, train

# Model and run sizes: dim, layers, heads, ctx, batch, steps; for lr-transfer, the width ×1
# (heads: one per 16 channels) and its own batch and steps.
SIZES: dict[str, dict[str, int]] = {
    "cpu": dict(dim=64, layers=2, heads=4, ctx=64, batch=32, steps=600,
                base=32, transfer_batch=16, transfer_steps=200),
    "gpu": dict(dim=384, layers=6, heads=6, ctx=256, batch=64, steps=2000,
                base=128, transfer_batch=64, transfer_steps=1000),
    "tiny": dict(dim=16, layers=1, heads=2, ctx=16, batch=4, steps=4,  # for the tests
                 base=8, transfer_batch=4, transfer_steps=3),
}  # fmt: skip


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.shown = -1

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        if self.tty:
            now = time.monotonic()
            if now - self.last < 0.1 and done < self.total:
                return
            self.last = now
            filled = int(30 * done / self.total)
            bar = "█" * filled + "·" * (30 - filled)
            end = "\n" if done == self.total else ""
            print(f"\r{self.label:24s} {bar} {done}/{self.total} loss {loss:.3f}", end=end,
                  file=sys.stderr, flush=True)  # fmt: skip
        elif 10 * done // self.total > self.shown:
            self.shown = 10 * done // self.total
            print(f"{self.label:24s} {done}/{self.total} loss {loss:.3f}", file=sys.stderr)


def _device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if args.size == "gpu" and torch.cuda.is_available() else "cpu")


def _run(name: str, args: argparse.Namespace, lr: float | None = None, dim: int | None = None,
         monitor: bool = False) -> tuple[Run, NormMonitor | None]:  # fmt: skip
    """One training run of optimizer ``name`` at the chosen size; ``dim``: an lr-transfer run
    at that width (with the transfer batch and steps)."""
    size = dict(SIZES[args.size])
    if dim is not None:
        size.update(dim=dim, heads=max(1, dim // 16), batch=size["transfer_batch"],
                    steps=size["transfer_steps"])  # fmt: skip
    steps = args.steps or size["steps"]
    data, val, vocab = args.data
    device = _device(args)
    torch.manual_seed(0)
    model = TinyGPT(vocab, dim=size["dim"], layers=size["layers"], heads=size["heads"],
                    ctx=size["ctx"]).to(device)  # fmt: skip
    opt = make_optimizer(name, model, lr=lr, backend=args.backend)
    watcher = NormMonitor(opt) if monitor else None
    label = OPTIMIZERS[name].label + (f" lr={lr:g}" if lr is not None else "")
    if dim is not None:
        label += f" d={dim}"
    bar = Progress(label, steps)
    every = max(1, steps // 50)

    def on_step(step: int, loss: float) -> None:
        bar(step, loss)
        if watcher is not None and (step % every == 0 or step == steps - 1):
            watcher.record(step)

    run = train(label, model, opt, data, val, steps=steps, batch=size["batch"],
                ctx=size["ctx"], device=device, on_step=on_step)  # fmt: skip
    return run, watcher


def _plot(path: Path, draw) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def _commit() -> str:
    """The source tree's git commit, when there is one."""
    import subprocess

    try:
        here = Path(__file__).parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _save(args: argparse.Namespace, name: str, payload: dict[str, Any]) -> Path:
    import datetime

    from ..newton_schulz import describe_device

    args.out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = dict(payload, command=args.command_line, size=args.size,
                   size_settings=SIZES[args.size], steps=args.steps, torch=torch.__version__,
                   device=str(_device(args)), machine=describe_device(_device(args)),
                   threads=torch.get_num_threads(), commit=_commit(), date=now)  # fmt: skip
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


# -------------------------------------------------------------------------------- commands
def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Train the same model with each optimizer; a table and the loss curves."""
    runs = {name: _run(name, args)[0] for name in args.optimizers}
    print(f"\n{'optimizer':24s} {'lr':>8} {'train loss':>10} {'val loss':>9} {'ms/step':>8}")
    for name, run in runs.items():
        print(f"{OPTIMIZERS[name].label:24s} {OPTIMIZERS[name].lr:8g} {run.train_loss:10.3f} "
              f"{run.val_loss:9.3f} {run.ms_per_step:8.1f}")  # fmt: skip
    payload = {name: {"lr": OPTIMIZERS[name].lr, "train_loss": r.train_loss,
                      "val_loss": r.val_loss, "ms_per_step": r.ms_per_step,
                      "diverged": r.diverged, "losses": r.losses}
               for name, r in runs.items()}  # fmt: skip
    print(f"results: {_save(args, 'compare', payload)}")
    print(plot_compare(payload, args.out / "compare.png"))
    return payload


def plot_compare(payload: dict[str, Any], path: Path) -> str:
    """The smoothed training loss of each optimizer against the step."""

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, run in payload.items():
            if name not in OPTIMIZERS:
                continue
            steps, losses = zip(*run["losses"], strict=True)
            label = f"{OPTIMIZERS[name].label} (val {run['val_loss']:.3f})"
            ax.plot(steps, _smooth(list(losses)), label=label)
        ax.set(xlabel="step", ylabel="train loss (smoothed)", title="Character-level GPT")
        ax.legend()
        return fig

    return _plot(path, draw)


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def lr_transfer(args: argparse.Namespace) -> dict[str, Any]:
    """Final validation loss against learning rate, per width, for Scion and AdamW."""
    widths = [SIZES[args.size]["base"] * m for m in args.multipliers]
    grids = {"scion": args.scion_lrs, "adamw": args.adamw_lrs}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, lrs in grids.items():
        results[name] = {}
        for width in widths:
            results[name][str(width)] = {}
            for lr in lrs:
                run, _ = _run(name, args, lr=lr, dim=width)
                loss = run.val_loss if not run.diverged else math.inf
                results[name][str(width)][str(lr)] = loss
    print()
    for name, per_width in results.items():
        for width, losses in per_width.items():
            best = min(losses, key=lambda k: losses[k])
            print(f"{OPTIMIZERS[name].label:24s} width {width:>5}: best lr {best} "
                  f"(val {losses[best]:.3f})")  # fmt: skip
    payload = {"widths": widths, "results": results}
    print(f"results: {_save(args, 'lr_transfer', payload)}")
    print(plot_lr_transfer(payload, args.out / "lr_transfer.png"))
    return payload


def plot_lr_transfer(payload: dict[str, Any], path: Path) -> str:
    """Validation loss against learning rate, a line per width, a panel per optimizer."""

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (name, per_width) in zip(axes, payload["results"].items(), strict=True):
            for width, losses in per_width.items():
                lrs = [float(k) for k in losses]
                vals = [v if math.isfinite(v) else float("nan") for v in losses.values()]
                ax.plot(lrs, vals, marker="o", label=f"width {width}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
            ax.minorticks_off()
            ax.set(xlabel="learning rate", ylabel="validation loss",
                   title=OPTIMIZERS[name].label)  # fmt: skip
            ax.legend()
        return fig

    return _plot(path, draw)


def norms(args: argparse.Namespace) -> dict[str, Any]:
    """‖W‖₂/(ρ·s) of every Spectral layer during training, constrained and unconstrained."""
    payload: dict[str, Any] = {}
    for name in ("scion", "uscion"):
        run, watcher = _run(name, args, monitor=True)
        assert watcher is not None
        payload[name] = {"val_loss": run.val_loss, "worst_ratio": watcher.worst_ratio(),
                         "history": watcher.state()}  # fmt: skip
        print(f"{OPTIMIZERS[name].label:24s} val loss {run.val_loss:.3f}, largest "
              f"‖W‖₂/(ρ·s) over all layers and steps: {watcher.worst_ratio():.3f}")  # fmt: skip
    print(f"results: {_save(args, 'norms', payload)}")
    print(plot_norms(payload, args.out / "norms.png"))
    return payload


def plot_norms(payload: dict[str, Any], path: Path) -> str:
    """‖W‖₂/(ρ·s) against the step, a line per layer, constrained beside unconstrained."""

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, name in zip(axes, ("scion", "uscion"), strict=True):
            for layer, history in payload[name]["history"].items():
                steps = [h[0] for h in history]
                ax.plot(steps, [h[1] / h[2] for h in history], lw=1, label=layer)
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set(xlabel="step", ylabel="‖W‖₂ / (ρ·s)", title=OPTIMIZERS[name].label)
        axes[0].legend(fontsize=6)
        return fig

    return _plot(path, draw)


COMMANDS = {"compare": compare, "lr-transfer": lr_transfer, "norms": norms}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scion_kernels.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("command", nargs="?", default="compare", choices=sorted(COMMANDS))
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--steps", type=int, default=None, help="override the size's step count")
    p.add_argument("--device", default=None, help="default: cuda for --size gpu, else cpu")
    p.add_argument("--out", type=Path, default=Path("demo_results"))
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="Scion's backend (auto: the timing table's pick)")  # fmt: skip
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="compare: which of " + ", ".join(OPTIMIZERS))  # fmt: skip
    p.add_argument("--multipliers", default="1,2,4,8", help="lr-transfer: width multipliers")
    p.add_argument("--scion-lrs", default="0.005,0.01,0.02,0.04,0.08")
    p.add_argument("--adamw-lrs", default="0.002,0.004,0.008,0.016,0.032")
    args = p.parse_args(argv)
    args.command_line = " ".join(["python -m scion_kernels.demo", *(argv or sys.argv[1:])])
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown:
        p.error(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    if "muon" in args.optimizers and not hasattr(torch.optim, "Muon"):
        print(f"torch {torch.__version__} has no torch.optim.Muon: leaving Muon out")
        args.optimizers.remove("muon")
    args.multipliers = [int(m) for m in args.multipliers.split(",")]
    args.scion_lrs = [float(x) for x in args.scion_lrs.split(",")]
    args.adamw_lrs = [float(x) for x in args.adamw_lrs.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    args.data = char_data()
    train_chars = len(args.data[0])
    print(f"{args.command}: character-level GPT on {train_chars:,} training characters of "
          f"Python's standard library (vocabulary {args.data[2]}), size {args.size}, "
          f"torch {torch.__version__}, device {_device(args)}")  # fmt: skip
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
