"""Which parameters of a group the Triton kernels take, and one kernel call per bucket.

A Spectral-family parameter (``Spectral``, ``SpectralConv``, or what ``Auto`` picks for it) with
Newton–Schulz in bf16 or fp16 is taken when its parameter, gradient and buffer can all be seen
as matrices without a copy; everything else stays on the reference path. Taken parameters are
bucketed by oriented shape, dtypes and coefficient set, and each bucket is one
:func:`~scion_kernels.kernels.newton_schulz.newton_schulz_bucket` call that averages,
orthogonalizes and updates in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..norms import Auto, Norm, Spectral

__all__ = ["fused_norm", "fused_step_", "spectral_step_"]

_NS_DTYPES = (torch.bfloat16, torch.float16)


def fused_norm(norm: Norm, shape: Sequence[int]) -> Norm | None:
    """The norm the kernels run for a parameter of ``shape`` (``Auto`` resolved), or ``None``."""
    from .rowwise import ROWWISE_NORMS

    if isinstance(norm, Auto):
        norm = norm.pick(shape)
    if isinstance(norm, Spectral):
        ok = norm.polar == "newton_schulz" and norm.ns_dtype in _NS_DTYPES
        return norm if ok else None
    return norm if isinstance(norm, ROWWISE_NORMS) else None


def fused_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Norm],
    **options: Any,
) -> list[int]:
    """The Scion step on every parameter the kernels take (``norms`` from :func:`fused_norm`);
    returns the indices of the others. ``options``: ``alpha``, ``lr``, ``scale``,
    ``constrained``."""
    from .rowwise import rowwise_step_

    left: list[int] = []
    for spectral, step in ((True, spectral_step_), (False, rowwise_step_)):
        idx = [i for i, n in enumerate(norms) if isinstance(n, Spectral) == spectral]
        if not idx:
            continue
        rest = step(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            None if bufs is None else [bufs[i] for i in idx],
            [norms[i] for i in idx],
            **options,
        )
        left.extend(idx[j] for j in rest)
    return sorted(left)


@dataclass
class _Bucket:
    norm: Spectral
    m: int
    n: int
    params: list[tuple[Tensor, bool]] = field(default_factory=list)
    grads: list[tuple[Tensor, bool]] = field(default_factory=list)
    bufs: list[tuple[Tensor, bool]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)


def spectral_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    norms: Sequence[Spectral],
    *,
    alpha: float,
    lr: float,
    scale: float,
    constrained: bool,
) -> list[int]:
    """The whole Scion step for the parameters the kernels can take; returns the others.

    For each taken parameter ``x`` (gradient ``g``, buffer ``d`` or none when ``bufs`` is
    ``None``)::

        d ← (1 − α)·d + α·g;   x ← (1 − γ)·x − γ·ρ·s·polar(d)   (or x ← x − γ·ρ·s·polar(d))

    Returns the indices of the parameters left for the reference path.
    """
    from .newton_schulz import NSBucket, matrix_table, matrix_view, newton_schulz_bucket

    left: list[int] = []
    buckets: dict[tuple, _Bucket] = {}
    for i, (p, g, norm) in enumerate(zip(params, grads, norms, strict=True)):
        d = None if bufs is None else bufs[i]
        views = [matrix_view(t, norm) for t in (p, g, d) if t is not None]
        if any(v is None for v in views):
            left.append(i)
            continue
        r, c = views[0].shape[-2:]
        tall = r > c
        m, n = (c, r) if tall else (r, c)
        key = (
            p.device, m, n, norm.ns_dtype, norm._table,
            p.dtype, g.dtype, None if d is None else d.dtype,
        )  # fmt: skip
        bucket = buckets.setdefault(key, _Bucket(norm, m, n))
        s = norm.scale_for(p.shape)
        pv, gv = views[0], views[1]
        for j in range(pv.shape[0]):
            bucket.params.append((pv[j], tall))
            bucket.grads.append((gv[j], tall))
            if d is not None:
                bucket.bufs.append((views[2][j], tall))
            bucket.scales.append(s)

    decay = 1.0 - lr if constrained else 1.0
    for key, bucket in buckets.items():
        device = key[0]
        count = len(bucket.params)
        coef = torch.tensor([-lr * scale * s for s in bucket.scales], dtype=torch.float32)
        newton_schulz_bucket(
            NSBucket(count, bucket.m, bucket.n, bucket.norm.ns_dtype, device),
            matrix_table(bucket.grads, device),
            bucket.grads[0][0],
            bucket.norm._table,
            alpha=alpha,
            bufs=matrix_table(bucket.bufs, device) if bucket.bufs else None,
            d_like=bucket.bufs[0][0] if bucket.bufs else None,
            params=matrix_table(bucket.params, device),
            p_like=bucket.params[0][0],
            coef=coef.to(device),
            decay=decay,
        )
    return left
