"""The memory-bound stages of a Scion step ("elementwise" rows), against the copy bandwidth.

Measured over the parameter list of GPT-2 small (124M parameters, fp32 state and gradients;
the quick suite keeps the same tensors with 2 transformer layers instead of 12):

- ``average``: ``d ← (1 − α)·d + α·g`` over every tensor, with the reference
  ``momentum_average_`` (backend ``torch``; the fused backends average inside their first
  launch, timed within whole steps).
- ``sign+update``: ``u ← Sign().lmo_many(g)`` then ``x ← (1 − γ)·x − γ·ρ·u`` with the
  reference ``apply_update_``, over the matrices (every 2-D tensor).
- ``biasrms``: ``BiasRMS().lmo_many(g)`` over the vectors (biases and norm gains).

Byte rule: ``gbps`` counts the traffic of the stage's data flow, each named tensor moved once
per access the algorithm needs, at the dtypes the code uses (fp32, 4 B): average reads ``d`` and
``g`` and writes ``d`` (12 B/element; the reference makes two passes and moves 20, a fused
pass would move 12); sign+update reads ``g``, writes ``u``, reads ``u``, reads and writes ``x``
(20 B/element; the foreach code makes five passes and moves 36); biasrms reads ``g`` for the
norm, reads it again and writes ``u`` (12 B/element, what the code moves). So ``gbps`` of two
backends of one stage compare as their times do, and ``ceiling_fraction`` (``gbps`` over the
copy bandwidth measured in the same run, :data:`LAST_COPY_GBPS`) is how close a stage runs to a
single fused pass at full bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from scion_kernels.elementwise import apply_update_, momentum_average_
from scion_kernels.norms import BiasRMS, Sign

from .common import Context, copy_bandwidth_gbps
from .models import GPT2

__all__ = ["LAST_COPY_GBPS", "gpt2_small_shapes", "run"]

#: The copy bandwidth (GB/s, read + write counted) measured by the latest :func:`run`.
LAST_COPY_GBPS: float | None = None

ALPHA = 0.1  # averaging factor α (momentum=0.1, i.e. β = 0.9)
LR = 0.01  # γ
SCALE = 1.0  # ρ
SEED = 1234

#: Bytes per element each stage is credited with (see the module docstring).
BYTES_PER_ELEMENT = {"average": 12, "sign+update": 20, "biasrms": 12}
#: Bytes per element the pure-PyTorch code actually moves, for the note.
TORCH_BYTES_PER_ELEMENT = {"average": 20, "sign+update": 36, "biasrms": 12}


def gpt2_small_shapes(layers: int = 12, **sizes: int) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (the step benchmark's model, tied output embedding):
    148 tensors, 124,439,808 elements for 12 layers; ``sizes`` (``dim``, ``vocab``) shrink
    it."""
    with torch.device("meta"):
        model = GPT2(n_layer=layers, **sizes)
    return [tuple(p.shape) for p in model.parameters()]


def _free(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _randn(ctx: Context, shapes: list[tuple[int, ...]], gen: torch.Generator) -> list[Tensor]:
    return [torch.randn(s, generator=gen, device=ctx.device, dtype=torch.float32) for s in shapes]


def _record(
    ctx: Context, stage: str, backend: str, tensors: list[Tensor], fn: Callable[[], Any]
) -> None:
    """Time ``fn`` (a whole-list pass of ``stage``) and add its row."""
    numel = sum(t.numel() for t in tensors)
    with torch.no_grad():
        ms = ctx.time_ms(fn)
    gbps = BYTES_PER_ELEMENT[stage] * numel / (ms * 1e-3) / 1e9
    moved = TORCH_BYTES_PER_ELEMENT[stage] if backend == "torch" else BYTES_PER_ELEMENT[stage]
    row: dict[str, Any] = {
        "bench": "elementwise",
        "backend": backend,
        "ms": ms,
        "shape": [len(tensors), 1, numel],
        "numel": numel,
        "dtype": "float32",
        "gbps": gbps,
        "note": (
            f"{stage}: list of {len(tensors)} tensors, {numel} elements; "
            f"{BYTES_PER_ELEMENT[stage]} B/element counted, the code moves {moved}"
        ),
    }
    if LAST_COPY_GBPS:
        row["ceiling_fraction"] = gbps / LAST_COPY_GBPS
    ctx.add(**row)
    ctx.log(f"elementwise {stage} {backend}: {ms:.4g} ms, {gbps:.4g} GB/s ({numel} elements)")


def run(ctx: Context) -> None:
    """Measure the copy bandwidth, then each memory-bound stage; one row per (stage, backend)."""
    global LAST_COPY_GBPS
    copy_numel = (1 << 28) if ctx.device.type == "cuda" else (1 << 20 if ctx.tiny else 1 << 25)
    LAST_COPY_GBPS = copy_bandwidth_gbps(ctx, copy_numel)
    _free(ctx)
    copy_bytes = 2 * 4 * copy_numel  # fp32, read + write
    ctx.add(
        bench="elementwise",
        backend="copy",
        ms=copy_bytes / (LAST_COPY_GBPS * 1e9) * 1e3,
        shape=[1, 1, copy_numel],
        numel=copy_numel,
        dtype="float32",
        gbps=LAST_COPY_GBPS,
        ceiling_fraction=1.0,
        note="copy: dst.copy_(src), read + write counted",
    )
    ctx.log(f"elementwise: measured copy bandwidth {LAST_COPY_GBPS:.4g} GB/s on {ctx.device}")

    shapes = (
        gpt2_small_shapes(2 if ctx.quick else 12, dim=64, vocab=256)
        if ctx.tiny
        else (gpt2_small_shapes(2 if ctx.quick else 12))
    )
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(SEED)
    grads = _randn(ctx, shapes, gen)
    # Each stage allocates its own state in a helper, so it is freed when the helper returns.
    _average(ctx, grads, _randn(ctx, shapes, gen))
    _free(ctx)
    matrices = [g for g in grads if g.ndim == 2]
    params = [p.mul_(0.02) for p in _randn(ctx, [tuple(g.shape) for g in matrices], gen)]
    _sign_update(ctx, matrices, params)
    del params, matrices
    _free(ctx)
    _biasrms(ctx, [g for g in grads if g.ndim == 1])
    del grads
    _free(ctx)


def _average(ctx: Context, grads: list[Tensor], state: list[Tensor]) -> None:
    """(1) ``d ← (1 − α)·d + α·g`` over every tensor, with the reference."""
    _record(ctx, "average", "torch", state, lambda: momentum_average_(state, grads, ALPHA))


def _sign_update(ctx: Context, grads: list[Tensor], params: list[Tensor]) -> None:
    """(2) ``u ← sign(g)/d_in``, then ``x ← (1 − γ)·x − γ·ρ·u`` over the matrices."""
    sign = Sign()
    _record(
        ctx,
        "sign+update",
        "torch",
        grads,
        lambda: apply_update_(params, sign.lmo_many(grads), LR, SCALE, constrained=True),
    )


def _biasrms(ctx: Context, grads: list[Tensor]) -> None:
    """(3) ``u ← g / (RMS(g) + ε)`` over the vectors."""
    rms = BiasRMS()
    _record(ctx, "biasrms", "torch", grads, lambda: rms.lmo_many(grads))
