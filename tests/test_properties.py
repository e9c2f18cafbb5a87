"""Property tests of the LMOs over random shapes and magnitudes from 1e-20 to 1e20 (float64).

Properties of every LMO (docs/math.md §2): finite and shape-preserving; ⟨g, lmo(g)⟩ is the dual norm
of g; invariant under positive scaling; odd; of norm equal to the radius. The ε-regularized
norms (ColNorm, RowNorm, BiasRMS) are checked with ε-aware formulas, or where ε is negligible.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scion_kernels.newton_schulz import resolve_coefficients
from scion_kernels.norms import BiasRMS, ColNorm, RowNorm, Sign, Spectral

F64 = torch.float64
EPS = 1e-8

NORMS = {
    "spectral-svd": Spectral(polar="svd"),
    "spectral-ns64-pe": Spectral(ns_dtype=F64, coefficients="polar_express"),
    "spectral-gram64-pe": Spectral(ns_dtype=F64, coefficients="polar_express", polar="gram"),
    "sign": Sign(),
    "sign-unnormalized": Sign(normalized=False),
    "colnorm": ColNorm(),
    "colnorm-normalized": ColNorm(normalized=True),
    "rownorm": RowNorm(),
    "rownorm-unnormalized": RowNorm(normalized=False),
    "biasrms": BiasRMS(),
}
# Newton–Schulz in float64 with the Polar Express coefficients, plain and in the Gram form.
NS64 = {"spectral-ns64-pe", "spectral-gram64-pe"}
EPS_NORMS = {"colnorm", "colnorm-normalized", "rownorm", "rownorm-unnormalized", "biasrms"}

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

norm_names = st.sampled_from(sorted(NORMS))
dims = st.integers(1, 24)
seeds = st.integers(0, 2**32 - 1)
log_magnitudes = st.floats(-20.0, 20.0)


def gaussian(m: int, n: int, seed: int, log_mag: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=gen, dtype=F64) * 10.0**log_mag


def divisors(name: str, g: torch.Tensor) -> torch.Tensor:
    """The ε-free divisor of each ε-regularized norm (the LMO is g / (divisor + ε))."""
    d_out, d_in = g.shape
    if name.startswith("colnorm"):
        div = g.norm(dim=0, keepdim=True) / math.sqrt(d_out)
        return div * d_in if name == "colnorm-normalized" else div
    if name.startswith("rownorm"):
        div = g.norm(dim=1, keepdim=True)
        return div * math.sqrt(d_in) if name == "rownorm" else div
    if name == "biasrms":
        return g.pow(2).mean().sqrt().reshape(1, 1)
    raise ValueError(name)


def dual_norm(name: str, g: torch.Tensor) -> float:
    """⟨g, lmo(g)⟩ from the norm's definition (ε-aware for the ε-regularized norms)."""
    d_out, d_in = g.shape
    if name == "spectral-svd":
        return math.sqrt(d_out / d_in) * torch.linalg.svdvals(g).sum().item()
    if name in NS64:
        # s·Σ σ_i·p(σ_i/‖g‖_F): the polynomial stands in for the exact polar factor's 1.
        sv = torch.linalg.svdvals(g)
        p = sv / torch.linalg.vector_norm(sv)
        for a, b, c in resolve_coefficients("polar_express"):
            p = a * p + b * p**3 + c * p**5
        return math.sqrt(d_out / d_in) * (sv * p).sum().item()
    if name == "sign":
        return g.abs().sum().item() / d_in
    if name == "sign-unnormalized":
        return g.abs().sum().item()
    # ε-regularized: Σ over slices of ‖slice‖² / (divisor + ε).
    div = divisors(name, g)
    sq = g.pow(2)
    if name.startswith("colnorm"):
        sq = sq.sum(dim=0, keepdim=True)
    elif name.startswith("rownorm"):
        sq = sq.sum(dim=1, keepdim=True)
    else:
        sq = sq.sum().reshape(1, 1)
    return (sq / (div + EPS)).sum().item()


@given(name=norm_names, m=dims, n=dims, seed=seeds, log_mag=log_magnitudes)
@PROPERTY_SETTINGS
def test_finite_and_shape_preserving(name, m, n, seed, log_mag):
    g = gaussian(m, n, seed, log_mag)
    out = NORMS[name].lmo(g)
    assert out.shape == g.shape and out.dtype == F64
    assert bool(out.isfinite().all())
    assert bool((out != 0).any())  # a non-zero gradient never gives a zero direction


@given(name=norm_names, m=dims, n=dims, seed=seeds, log_mag=log_magnitudes)
@PROPERTY_SETTINGS
def test_inner_product_is_dual_norm(name, m, n, seed, log_mag):
    g = gaussian(m, n, seed, log_mag)
    inner = (g * NORMS[name].lmo(g)).sum().item()
    assert inner > 0
    assert inner == pytest.approx(dual_norm(name, g), rel=1e-9)


@given(
    name=norm_names,
    m=dims,
    n=dims,
    seed=seeds,
    log_mag=log_magnitudes,
    log_c=st.floats(-10.0, 10.0),
)
@PROPERTY_SETTINGS
def test_scale_invariance(name, m, n, seed, log_mag, log_c):
    g = gaussian(m, n, seed, log_mag)
    c = 10.0**log_c
    norm = NORMS[name]
    rtol = 1e-8
    if name in EPS_NORMS:
        # Only where ε is small next to every divisor, for g and for c·g; each output entry then
        # moves by a relative ε/divisor at most.
        smallest = min(divisors(name, g).min().item(), c * divisors(name, g).min().item())
        assume(smallest >= 1e-2)
        rtol = 2 * EPS / smallest + 1e-12
    if name == "spectral-svd":
        # The polar factor's sensitivity to the rounding of c·g is 1/σ_min.
        sv = torch.linalg.svdvals(g)
        assume((sv.min() / sv.max()).item() >= 1e-6)
    a, b = norm.lmo(c * g), norm.lmo(g)
    if name.startswith("sign"):
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a, b, rtol=0, atol=rtol * b.abs().max().item())


@given(name=norm_names, m=dims, n=dims, seed=seeds, log_mag=log_magnitudes)
@PROPERTY_SETTINGS
def test_odd_symmetry(name, m, n, seed, log_mag):
    g = gaussian(m, n, seed, log_mag)
    norm = NORMS[name]
    assert torch.equal(norm.lmo(-g), -norm.lmo(g))


@given(name=norm_names, m=dims, n=dims, seed=seeds, log_mag=log_magnitudes)
@PROPERTY_SETTINGS
def test_lmo_norm_equals_radius(name, m, n, seed, log_mag):
    g = gaussian(m, n, seed, log_mag)
    out = NORMS[name].lmo(g)
    d_out, d_in = g.shape
    s = math.sqrt(d_out / d_in)
    if name == "spectral-svd":
        assert torch.linalg.matrix_norm(out, ord=2).item() == pytest.approx(s, rel=1e-12)
    elif name in NS64:
        # Newton–Schulz lands the largest singular value in s·[0.8588, 1.1412].
        top = torch.linalg.matrix_norm(out, ord=2).item() / s
        assert 0.8588 <= top <= 1.1412
    elif name == "sign":
        assert torch.equal(out.abs(), torch.full_like(out, 1 / d_in))
    elif name == "sign-unnormalized":
        assert torch.equal(out.abs(), torch.ones_like(out))
    else:
        # ε-aware: each slice's (scaled) norm is divisor / (divisor + ε) of the radius.
        div = divisors(name, g)
        got = divisors(name, out)
        assert torch.allclose(got, div / (div + EPS), rtol=1e-10, atol=0)


@given(name=st.sampled_from(sorted(NS64)), m=dims, n=dims, seed=seeds, log_mag=log_magnitudes)
@PROPERTY_SETTINGS
def test_polar_express_float64_singular_value_range(name, m, n, seed, log_mag):
    g = gaussian(m, n, seed, log_mag)
    sv = torch.linalg.svdvals(g)
    assume((sv.min() / torch.linalg.vector_norm(sv)).item() >= 1e-3)
    out = NORMS[name].lmo(g) / math.sqrt(m / n)
    out_sv = torch.linalg.svdvals(out)
    assert 0.855 <= out_sv.min().item() and out_sv.max().item() <= 1.145
