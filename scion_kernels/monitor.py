"""Watch each layer's spectral norm against the radius Scion keeps it in.

For a Spectral-family parameter ``W`` of a group with radius ``ρ``, the LMO has spectral norm
``s = scale_for(W.shape)`` (``√(d_out/d_in)``, or what the norm's options make it), so the
constrained step ``W ← (1 − γ)·W − γ·ρ·lmo(d)`` keeps ``‖W‖₂ ≤ ρ·s`` once it holds — up to the
largest singular value Newton–Schulz leaves in its approximate ``polar`` (about 1.2 for the
``classic`` coefficients, 1.14 for ``polar_express``, exactly 1 with ``polar="svd"``). The
unconstrained step has no such bound.

``‖W‖₂`` is estimated by a few Lanczos steps (power iteration that keeps its Krylov
subspace) on ``WᵀW``, warm-started from the previous record's vector, so a record costs a
few matrix-vector products per layer::

    monitor = NormMonitor(opt)
    for step in range(steps):
        ...
        opt.step()
        if step % 10 == 0:
            monitor.record(step)
    monitor.history["blocks.0.fc.weight"]   # [(step, ‖W‖₂, ρ·s), ...]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .norms import Spectral, make_norm

__all__ = ["NormMonitor", "spectral_norm"]


def _one_matrix(norm: Spectral, shape: Any) -> bool:
    """Whether ``norm`` sees a tensor of ``shape`` as one matrix, its reshape to
    ``(shape[0], -1)`` (not stacked, grouped, ``split``, per tap or a transposed conv's)."""
    return norm.matrix_shape(shape)[0] == 1 and norm.plain_reshape()


def spectral_norm(
    w: Tensor, iterations: int = 20, vector: Tensor | None = None
) -> tuple[float, Tensor]:
    """``‖w‖₂`` of a matrix (``w`` reshaped to ``(w.shape[0], -1)``) by ``iterations`` steps
    of Lanczos on ``wᵀw`` — power iteration that keeps its Krylov subspace, so a flat top of
    the spectrum (Scion's near-orthogonal weights) costs no more steps than a gap does — in
    float32 (float64 for float64 input), from ``vector`` (a guess of the top right singular
    vector) or a fixed pseudo-random start.

    Returns the estimate (a lower bound, converging from below) and the top Ritz vector, to
    warm-start the next call.
    """
    m = w.detach().reshape(w.shape[0], -1)
    m = m.to(torch.float64 if m.dtype == torch.float64 else torch.float32)
    if vector is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        vector = torch.randn(m.shape[1], generator=gen, dtype=m.dtype).to(m.device)
    tiny = torch.finfo(m.dtype).tiny
    basis = [vector.to(m.dtype) / vector.norm().clamp_min(tiny)]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for _ in range(max(1, min(iterations, m.shape[1]))):
        z = m.mT @ (m @ basis[-1])
        alphas.append(torch.dot(z, basis[-1]))
        q = torch.stack(basis, 1)
        z = z - q @ (q.mT @ z)  # full reorthogonalization: the basis stays orthonormal
        z = z - q @ (q.mT @ z)
        beta = z.norm()
        if float(beta) <= 1e-6 * float(alphas[0].abs().clamp_min(tiny)):
            break  # the Krylov space is exhausted: the tridiagonal's top value is exact
        betas.append(beta)
        basis.append(z / beta)
    k = len(alphas)
    t = torch.diag(torch.stack(alphas).double())
    if k > 1:
        off = torch.stack(betas[: k - 1]).double()
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    top = torch.stack(basis[:k], 1) @ vectors[:, -1].to(m.dtype)
    return float(values[-1].clamp_min(0).sqrt()), top


class NormMonitor:
    """Records ``(step, ‖W‖₂, ρ·s)`` for every Spectral-family parameter of a Scion optimizer.

    Args:
        optimizer: a :class:`~scion_kernels.Scion` or :class:`~scion_kernels.ScionLight`.
        names: ``{parameter: name}`` for readable keys (default: the groups' ``param_names``,
            as :func:`~scion_kernels.param_groups` sets them, else ``"group g, parameter i"``).
        iterations: Lanczos steps per record after the first (which runs 60).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        names: dict[Tensor, str] | None = None,
        iterations: int = 10,
    ) -> None:
        self.iterations = int(iterations)
        #: name → list of (step, spectral norm, radius ρ·s)
        self.history: dict[str, list[tuple[int, float, float]]] = {}
        self._watched: list[tuple[str, Tensor, float]] = []
        self._vectors: dict[str, Tensor] = {}
        for g, group in enumerate(optimizer.param_groups):
            norm = make_norm(group["norm"], group.get("norm_kwargs") or {})
            labels = group.get("param_names")
            for i, p in enumerate(group["params"]):
                picked = norm.pick(p.shape)
                if not isinstance(picked, Spectral) or not _one_matrix(picked, p.shape):
                    continue
                if names is not None and p in names:
                    name = names[p]
                elif labels is not None and i < len(labels):
                    name = labels[i]
                else:
                    name = f"group {g}, parameter {i}"
                radius = float(group["scale"]) * picked.scale_for(p.shape)
                self._watched.append((name, p, radius))
                self.history[name] = []

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._watched]

    @torch.no_grad()
    def record(self, step: int) -> dict[str, float]:
        """Estimate every watched layer's ``‖W‖₂`` now; returns ``{name: ‖W‖₂ / (ρ·s)}``."""
        ratios = {}
        for name, p, radius in self._watched:
            first = name not in self._vectors
            sigma, self._vectors[name] = spectral_norm(
                p, 60 if first else self.iterations, self._vectors.get(name)
            )
            self.history[name].append((int(step), sigma, radius))
            ratios[name] = sigma / radius
        return ratios

    def worst_ratio(self) -> float:
        """The largest ``‖W‖₂ / (ρ·s)`` recorded over all layers and steps (0 if none)."""
        return max((s / r for h in self.history.values() for _, s, r in h), default=0.0)

    def state(self) -> dict[str, Any]:
        """The history as plain data (for JSON)."""
        return {name: [list(t) for t in h] for name, h in self.history.items()}
