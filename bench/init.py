"""``Scion.init()`` on a whole model ("init" rows): what it costs to put every weight on its
sphere, against the QR count that bounds it.

The model is a Llama layout of plain modules (no forward: the groups name the head): token
embedding, per block Q, K, V, O and the three MLP matrices, norm gains, an untied head.
``llama-1.1b`` is TinyLlama's (22 blocks, 2048 wide, MLP 5632, 4 KV heads of 64, vocabulary
32000: 1.10B parameters); ``llama-tiny`` keeps the plumbing at CPU-test size. Built on ``meta``
and materialized on the device with ``to_empty``, as a large model is; then ``init()`` is timed
from the first call (``first_s``: the solver's set-up included) and, on a GPU, as the median of
three more (``ms``; on a CPU ``ms`` is the first call). The full suite, and the check's on a
GPU, take ``llama-1.1b``; the others ``llama-tiny``.

Each layout is timed with both ``draws`` of ``init()``: ``independent`` (one QR per matrix, the
default) and ``shared`` (one QR per shape, signed row permutations of it per matrix). The
``shared`` row is timed first, so its ``first_s`` includes the operating system's first touch
of the freshly materialized memory; ``touch_s`` is that cost alone (one ``zero_()`` pass over a
second model materialized the same way).

FLOP count: one Householder QR per orthogonal draw, ``4mn² − 4n³/3`` for an ``m × n`` Gaussian
(``m ≥ n``: the factorization and forming Q), summed over the Spectral weights; ``tflops`` is that
count over ``ms`` (``independent`` rows only). The Sign head (zeroed), embedding (normalized
columns) and gains add only memory traffic.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn

from scion_kernels import Scion, param_groups

from .common import Context

__all__ = ["LAYOUTS", "LlamaLayout", "qr_flops", "run"]

#: name: (width, MLP width, blocks, K/V width, vocabulary).
LAYOUTS = {
    "llama-1.1b": (2048, 5632, 22, 256, 32000),
    "llama-tiny": (128, 352, 2, 32, 1000),
}


class LlamaLayout(nn.Module):
    """The parameters of a Llama model of ``LAYOUTS[name]``, with no forward."""

    def __init__(self, name: str):
        super().__init__()
        d, ffn, blocks, kv, vocab = LAYOUTS[name]
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            for attr, (d_out, d_in) in {
                "q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d),
                "gate": (ffn, d), "up": (ffn, d), "down": (d, ffn),
            }.items():  # fmt: skip
                setattr(block, attr, nn.Linear(d_in, d_out, bias=False))
            block.attn_norm = nn.RMSNorm(d)
            block.mlp_norm = nn.RMSNorm(d)
            self.blocks.append(block)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def qr_flops(groups: list[dict]) -> float:
    """The Householder QR count of ``init()`` over the Spectral groups' weights."""
    total = 0.0
    for g in groups:
        if g["norm"] != "Spectral":
            continue
        for p in g["params"]:
            m, n = max(p.shape[-2:]), min(p.shape[-2:])
            total += 4 * m * n * n - 4 * n**3 / 3
    return total


def _timed_init(ctx: Context, opt: Scion, draws: str) -> float:
    """Seconds of one ``opt.init(draws=draws)``, the device synchronized on both sides."""
    ctx.sync()
    t0 = time.perf_counter()
    opt.init(draws=draws)
    ctx.sync()
    return time.perf_counter() - t0


def _materialized(name: str, device: torch.device) -> nn.Module:
    """A ``LlamaLayout`` built on ``meta`` and materialized on ``device`` (memory not touched)."""
    with torch.device("meta"):
        model = LlamaLayout(name)
    return model.to_empty(device=device)


def _touch_s(ctx: Context, name: str) -> float:
    """Seconds of one ``zero_()`` pass over a freshly materialized model: the first touch."""
    model = _materialized(name, ctx.device)
    ctx.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ctx.sync()
    return time.perf_counter() - t0


def run(ctx: Context) -> None:
    """Rows per layout the suite sizes for the device: each ``draws``."""
    big = not ctx.quick and not ctx.tiny  # the full suite, or the check's on a GPU
    gpu = ctx.device.type == "cuda"
    for name in ["llama-1.1b"] if big else ["llama-tiny"]:
        touch_s = _touch_s(ctx, name)
        if gpu:
            torch.cuda.empty_cache()
        model = _materialized(name, ctx.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no forward: the head is named
            groups = param_groups(model, head="head", example_inputs=False)
        opt = Scion(groups, lr=2**-7, momentum=0.1)
        flops = qr_flops(groups)
        numel = sum(p.numel() for p in model.parameters())
        for draws in ("shared", "independent"):
            first_s = _timed_init(ctx, opt, draws)
            # A call is seconds to minutes long on a CPU: there the first is the figure.
            ms = 1e3 * (
                statistics.median(_timed_init(ctx, opt, draws) for _ in range(3))
                if gpu
                else first_s
            )
            row = ctx.add(
                bench="init",
                backend="torch",
                model=name,
                draws=draws,
                ms=ms,
                first_s=round(first_s, 3),
                touch_s=touch_s,
                numel=numel,
                tflops=flops / (ms * 1e-3) / 1e12 if draws == "independent" else None,
                note=f"{flops / 1e12:.3g} TFLOP of QR" if draws == "independent" else "",
            )
            ctx.log(f"init {name} ({numel / 1e9:.3g}B parameters), {draws}: {row['ms']:.1f} ms")
        del opt, groups, model
        if gpu:
            torch.cuda.empty_cache()
