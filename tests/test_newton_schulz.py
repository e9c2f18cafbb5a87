"""Newton–Schulz and the exact polar factor, against float64 SVD (docs/math.md §4).

For ``G = U·Σ·Vᵀ`` and ``X₀ = G/‖G‖_F``, every Newton–Schulz step maps each normalized singular
value ``σ̂ = σ/‖G‖_F`` through ``aσ + bσ³ + cσ⁵`` and leaves ``U`` and ``V`` alone, so the output
is exactly ``U·diag(p(σ̂))·Vᵀ`` with ``p`` the composed scalar polynomial. In float64 compute
that identity holds to rounding; in low precision it holds to that precision's level.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from scion_kernels.newton_schulz import (
    COEFFICIENTS,
    newton_schulz,
    polar_svd,
    resolve_coefficients,
)

F64 = torch.float64
CLASSIC = (3.4445, -4.7750, 2.0315)

# Shapes of the accuracy tests: degenerate, square, very wide / very tall, a cheap 4097-column
# case (m = 8) and a batch.
SHAPES = [(1, 1), (1, 9), (9, 1), (7, 7), (7, 129), (129, 7), (33, 65), (8, 4097), (3, 16, 40)]

# The submodule (the package attribute of that name is the function).
ns_module = importlib.import_module("scion_kernels.newton_schulz")


def _ids(shape):
    return "x".join(map(str, shape))


def compose(sigma: torch.Tensor, coefficients, steps=None) -> torch.Tensor:
    """The composed scalar polynomial of a coefficient set, applied in float64."""
    x = sigma.to(F64)
    for a, b, c in resolve_coefficients(coefficients, steps):
        x = a * x + b * x**3 + c * x**5
    return x


def conditioned(shape, cond=10.0, dtype=F64) -> torch.Tensor:
    """A random matrix (batch) with singular values log-spaced in [1/cond, 1]."""
    *batch, m, n = shape
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(*batch, m, k, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(*batch, n, k, dtype=F64))
    s = torch.logspace(0.0, -math.log10(cond), k, dtype=F64)
    return ((q1 * s) @ q2.mT).to(dtype)


def normalized_svd(G: torch.Tensor):
    """Float64 thin SVD of ``G`` and its singular values divided by ``‖G‖_F``."""
    Gd = G.to(F64)
    U, S, Vh = torch.linalg.svd(Gd, full_matrices=False)
    fro = torch.linalg.matrix_norm(Gd).unsqueeze(-1)
    return U, S / fro, Vh


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``‖a − b‖_F / ‖b‖_F`` over the batch, in float64."""
    a, b = a.to(F64), b.to(F64)
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).max().item()


def input_for(dtype: torch.dtype, shape) -> torch.Tensor:
    """A fresh Gaussian input: float64 for float64 compute, float32 otherwise."""
    return torch.randn(shape, dtype=F64 if dtype == F64 else torch.float32)


# ---------------------------------------------------------------------------------------------
# resolve_coefficients
# ---------------------------------------------------------------------------------------------


class TestResolveCoefficients:
    def test_classic_is_muons_quintic_five_times(self):
        assert resolve_coefficients("classic") == (CLASSIC,) * 5
        assert resolve_coefficients() == (CLASSIC,) * 5  # the default set

    def test_polar_express_is_the_five_step_table(self):
        table = resolve_coefficients("polar_express")
        assert table == COEFFICIENTS["polar_express"]
        assert len(table) == 5
        # The numbers quoted in docs/math.md §4, to their 4 decimals.
        quoted = [
            (8.1566, -22.4833, 15.8788),
            (4.0429, -2.8089, 0.5000),
            (3.8917, -2.7725, 0.5061),
            (3.2858, -2.3681, 0.4645),
            (2.3465, -1.7098, 0.4232),
        ]
        for got, want in zip(table, quoted, strict=True):
            assert got == pytest.approx(want, abs=5e-5)

    @pytest.mark.parametrize("steps", [1, 3, 5, 8], ids=lambda s: f"steps{s}")
    def test_named_set_steps(self, steps):
        assert resolve_coefficients("classic", steps) == (CLASSIC,) * steps
        pe = COEFFICIENTS["polar_express"]
        want = tuple(pe[min(i, len(pe) - 1)] for i in range(steps))
        assert resolve_coefficients("polar_express", steps) == want

    def test_polar_express_longer_repeats_last_triple(self):
        table = resolve_coefficients("polar_express", 7)
        assert table[:5] == COEFFICIENTS["polar_express"]
        assert table[5] == table[6] == COEFFICIENTS["polar_express"][-1]

    def test_explicit_triples_default_to_their_length(self):
        table = resolve_coefficients([(1, 2, 3), (4.5, -5, 6)])
        assert table == ((1.0, 2.0, 3.0), (4.5, -5.0, 6.0))
        assert all(isinstance(x, float) for t in table for x in t)

    def test_explicit_shorter_set_repeats_last_triple(self):
        table = resolve_coefficients([(1, 2, 3), (4, 5, 6)], steps=4)
        assert table == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0))

    def test_explicit_longer_set_is_cut(self):
        table = resolve_coefficients([(1, 2, 3), (4, 5, 6), (7, 8, 9)], steps=2)
        assert table == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))

    def test_tuple_of_tuples_and_lists_accepted(self):
        assert resolve_coefficients(((1, 0, 0),)) == ((1.0, 0.0, 0.0),)
        assert resolve_coefficients([[2, 0, 0]], steps=2) == ((2.0, 0.0, 0.0),) * 2

    @pytest.mark.parametrize(
        "coefficients, match",
        [
            pytest.param("nope", "unknown Newton–Schulz coefficient set 'nope'", id="unknown-name"),
            pytest.param("", "unknown Newton–Schulz coefficient set", id="empty-name"),
            pytest.param([], "empty", id="empty-list"),
            pytest.param([(1.0, float("nan"), 2.0)], "finite", id="nan"),
            pytest.param([(1.0, 2.0, float("inf"))], "finite", id="inf"),
            pytest.param([(1.0, 2.0, 3.0), (-float("inf"), 0, 0)], "finite", id="neg-inf-second"),
            pytest.param([(1.0, 2.0)], "triples", id="pair"),
            pytest.param([(1.0, 2.0, 3.0, 4.0)], "triples", id="quadruple"),
            pytest.param([("a", "b", "c")], "triples", id="strings"),
            pytest.param([1.0, 2.0, 3.0], "triples", id="flat-list"),
            pytest.param(None, "triples", id="none"),
        ],
    )
    def test_bad_coefficients(self, coefficients, match):
        with pytest.raises(ValueError, match=match):
            resolve_coefficients(coefficients)

    @pytest.mark.parametrize("coefficients", ["classic", [(1, 2, 3)]], ids=["named", "explicit"])
    @pytest.mark.parametrize("steps", [0, -1, True, False, 2.5, "3"], ids=repr)
    def test_bad_steps(self, coefficients, steps):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            resolve_coefficients(coefficients, steps)

    def test_unknown_name_lists_the_sets(self):
        with pytest.raises(ValueError) as info:
            resolve_coefficients("Classic")
        for name in COEFFICIENTS:
            assert name in str(info.value)


# ---------------------------------------------------------------------------------------------
# The scalar polynomials: what each coefficient set does to a singular value
# ---------------------------------------------------------------------------------------------

SIGMA = torch.logspace(-3, 0, 200_001, dtype=F64)  # dense grid on [1e-3, 1], both ends included


def test_scalar_range_polar_express():
    out = compose(SIGMA, "polar_express")
    lo, hi = out.min().item(), out.max().item()
    # [0.8588, 1.1412], and tight: the set really uses that range.
    assert 0.8588 <= lo < 0.8590
    assert 1.1410 < hi <= 1.1412
    # Minimax optimality: the error equioscillates around 1, so the extremes are symmetric.
    assert lo + hi == pytest.approx(2.0, abs=1e-6)


def test_scalar_range_classic():
    out = compose(SIGMA, "classic")
    lo, hi = out.min().item(), out.max().item()
    # Muon's quintic does not converge to 1: about [0.47, 1.21].
    assert 0.47 <= lo < 0.48
    assert 1.20 < hi <= 1.21
    # The smallest σ is the worst case: 5 steps of slope ≈ 3.4445 at 0.
    assert out[0].item() == pytest.approx(lo)


#: Every named set's default composition on σ ∈ [1e-3, 1], as its comment in
#: scion_kernels/newton_schulz.py quotes it (4 decimals), and its default step count.
PRESET_RANGES = {
    "classic": (5, 0.4705, 1.2024),
    "cubic": (5, 0.0076, 1.0),
    "you": (5, 0.4750, 1.1450),
    "deepseek_v4": (10, 1.0000, 1.0005),
    "polar_express": (5, 0.8589, 1.1411),
    "turbo_muon": (4, 0.1204, 1.1450),
    "cans": (5, 0.8866, 1.1134),
    "cans_cubic": (8, 0.9463, 1.0537),
}


@pytest.mark.parametrize("degree", [3, 5])
@pytest.mark.parametrize("lo, hi", [(1e-3, 1.0), (0.3, 1.7), (0.9, 1.1)])
def test_cans_polynomial_is_minimax(degree, lo, hi):
    """Each CANS step is the best uniform approximation of 1 on its interval: ``1 − p``
    reaches ±E with alternating signs at degree//2 + 2 points (the alternation theorem), and
    no odd polynomial of that degree does better there (a perturbed one is worse)."""
    from scion_kernels.newton_schulz import _minimax_odd

    (a, b, c), err = _minimax_odd(lo, hi, degree)
    assert degree == 5 or c == 0.0
    x = torch.linspace(lo, hi, 200_001, dtype=F64)
    e = 1 - (a * x + b * x**3 + c * x**5)
    assert e.abs().max().item() == pytest.approx(err, rel=1e-9)
    # Sign changes of the error at its extremes: count the alternation points.
    extremes = e[(e.abs() > err * (1 - 1e-6))]
    signs = torch.sign(extremes)
    alternations = 1 + int((signs[1:] != signs[:-1]).sum())
    assert alternations == degree // 2 + 2
    for da in (1e-4, -1e-4):
        worse = 1 - ((a + da) * x + b * x**3 + c * x**5)
        assert worse.abs().max().item() > err


def test_cans_coefficients_compose_and_refuse():
    from scion_kernels.newton_schulz import cans_coefficients

    table = cans_coefficients(3, 0.01, 3)
    assert len(table) == 3 and all(c == 0.0 for _, _, c in table)
    out = compose(torch.logspace(-2, 0, 10_001, dtype=F64), table)
    assert out.min().item() + out.max().item() == pytest.approx(2.0, abs=1e-6)  # grid-limited
    assert COEFFICIENTS["cans"] == cans_coefficients()
    for bad, match in ((dict(degree=7), "degree"), (dict(lower=0.0), "lower"),
                       (dict(lower=1.0), "lower"), (dict(steps=0), "steps")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cans_coefficients(**bad)


def test_every_preset_is_checked():
    assert set(PRESET_RANGES) == set(COEFFICIENTS)


@pytest.mark.parametrize("name", sorted(PRESET_RANGES))
def test_preset_ranges_and_steps(name):
    """Each preset's default steps and the image of [1e-3, 1], to the quoted 4 decimals;
    every step's polynomial fixes 0 and keeps σ ≥ 0 on the way (no sign flips)."""
    steps, lo, hi = PRESET_RANGES[name]
    assert len(resolve_coefficients(name)) == steps
    out = compose(SIGMA, name)
    assert out.min().item() == pytest.approx(lo, abs=5e-5)
    assert out.max().item() == pytest.approx(hi, abs=5e-5)
    x = SIGMA.clone()
    for a, b, c in resolve_coefficients(name):
        x = a * x + b * x**3 + c * x**5
        assert bool((x > 0).all())


@pytest.mark.parametrize("shape", [(3, 20, 50), (1, 7, 7), (2, 1, 9), (1, 4, 30)], ids=_ids)
def test_aol_rescaling(shape):
    """The rows scaled by ``(Σ_j |X·Xᵀ|_ij)^(−1/2)``: spectral norm at most 1, exactly 1 for a
    rank-one matrix, a matrix with orthogonal rows unchanged up to its row norms (all 1), a
    zero matrix left zero, and the same scaling in float32 as in float64."""
    aol_ = ns_module.aol_
    G = torch.randn(shape, dtype=F64)
    X = aol_(ns_module.normalized_stack([G], F64))
    assert torch.linalg.matrix_norm(X, 2).max().item() <= 1 + 1e-12
    expected = G / (G @ G.mT).abs().sum(-1, keepdim=True).sqrt()  # the rescaling ignores scale
    assert rel_fro(X, expected) < 1e-12
    batch, m, n = shape
    one = torch.randn(batch, m, 1, dtype=F64) @ torch.randn(batch, 1, n, dtype=F64)
    sv = torch.linalg.svdvals(aol_(ns_module.normalized_stack([one], F64)))
    assert sv[..., 0] == pytest.approx(torch.ones(batch, dtype=F64))
    Q = torch.linalg.qr(torch.randn(batch, n, m, dtype=F64))[0].mT
    assert rel_fro(aol_(Q.clone()), Q) < 1e-12
    assert torch.equal(aol_(torch.zeros(shape, dtype=F64)), torch.zeros(shape, dtype=F64))
    x32 = ns_module.normalized_stack([G.float()], torch.float32)
    assert rel_fro(aol_(x32), X) < 1e-5


@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(7, 129), (129, 7), (33, 65), (3, 16, 40)], ids=_ids)
def test_turbo_muon_is_the_polynomial_of_the_aol_matrix(shape, dtype, rtol):
    """``turbo_muon``: the AOL-rescaled matrix's singular values through its 4 steps."""
    G = input_for(dtype, shape)
    tall = shape[-2] > shape[-1]
    W = (G.mT if tall else G).to(F64).reshape(-1, *sorted(shape[-2:]))
    P = ns_module.aol_(ns_module.normalized_stack([W], F64))
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    expected = (U * compose(S, "turbo_muon").unsqueeze(-2)) @ Vh
    expected = expected.reshape(G.mT.shape if tall else G.shape)
    X = newton_schulz(G, "turbo_muon", dtype=dtype)
    assert rel_fro(X.mT if tall else X, expected) < rtol


def test_turbo_muon_one_step_fewer_than_you():
    """Turbo-Muon's claim, on GPT-2's 768×3072 Gaussian in float32: its 4 steps from the AOL
    matrix come about as close to U·Vᵀ as ``you``'s 5 from G/‖G‖_F (0.0175 against 0.0159
    measured), and much closer than ``you``'s last 4 steps alone (0.041): the Frobenius
    normalization shrinks every σ by about √768, the rescaling does not."""
    G = torch.randn(768, 3072)
    exact = ns_module.polar_svd(G)
    f32 = torch.float32
    turbo = rel_fro(newton_schulz(G, "turbo_muon", dtype=f32), exact)
    five = rel_fro(newton_schulz(G, "you", dtype=f32), exact)
    four = rel_fro(newton_schulz(G, COEFFICIENTS["turbo_muon"], dtype=f32), exact)
    assert turbo < 1.25 * five and turbo < 0.6 * four, (turbo, five, four)


def test_deepseek_v4_schedule():
    """Eight classic steps, then two of the quintic with p(1) = 1 and p'(1) = 0."""
    table = resolve_coefficients("deepseek_v4")
    assert table[:8] == (CLASSIC,) * 8 and table[8:] == ((2.0, -1.5, 0.5),) * 2
    a, b, c = table[-1]
    assert a + b + c == 1.0 and a + 3 * b + 5 * c == 0.0


@pytest.mark.parametrize(
    "name, lo, hi", [("classic", 0.0, 1.21), ("polar_express", 0.0, 1.1412)], ids=["classic", "pe"]
)
def test_scalar_below_1e3_stays_bounded(name, lo, hi):
    """Below σ = 1e-3 the output is smaller, never negative nor larger than the set's maximum."""
    sigma = torch.linspace(0, 1e-3, 10_001, dtype=F64)
    out = compose(sigma, name)
    assert out[0].item() == 0.0
    assert lo <= out.min().item() and out.max().item() <= hi
    assert bool((out[1:] > 0).all())


@pytest.mark.parametrize("name", ["classic", "polar_express"])
def test_scalar_safety_margin_above_one(name):
    """Low-precision singular values drift slightly above 1; up to 1.02 the sets stay in range."""
    sigma = torch.linspace(1.0, 1.02, 2001, dtype=F64)
    full = compose(SIGMA, name)
    out = compose(sigma, name)
    assert full.min().item() - 1e-6 <= out.min().item()
    assert out.max().item() <= full.max().item() + 1e-6


# ---------------------------------------------------------------------------------------------
# newton_schulz against the exact SVD
# ---------------------------------------------------------------------------------------------

# (coefficient set, compute dtype, bound on ‖X − U·diag(p(σ̂))·Vᵀ‖_F / ‖U·diag(p(σ̂))·Vᵀ‖_F).
# float64/float32: rounding of the matrix products. float16/bfloat16: the operand rounding
# (2⁻¹¹ / 2⁻⁹ relative) is amplified by the composed polynomial's slope; the Polar Express
# composition is much steeper than the classic one (its first step has coefficients up to 22),
# so its bf16 error is several times the classic one (measured up to ≈ 0.09 over 20 seeds).
IDENTITY_CASES = [
    pytest.param("classic", F64, 1e-10, id="classic-f64"),
    pytest.param("polar_express", F64, 1e-10, id="pe-f64"),
    pytest.param("classic", torch.float32, 1e-4, id="classic-f32"),
    pytest.param("polar_express", torch.float32, 1e-4, id="pe-f32"),
    pytest.param("classic", torch.float16, 1e-2, id="classic-f16"),
    pytest.param("polar_express", torch.float16, 2e-2, id="pe-f16"),
    pytest.param("classic", torch.bfloat16, 3e-2, id="classic-bf16"),
    pytest.param("polar_express", torch.bfloat16, 0.12, id="pe-bf16"),
    pytest.param("you", F64, 1e-10, id="you-f64"),
    pytest.param("deepseek_v4", F64, 1e-10, id="dsv4-f64"),
    pytest.param("cubic", F64, 1e-10, id="cubic-f64"),
    pytest.param("you", torch.float32, 1e-4, id="you-f32"),
    pytest.param("deepseek_v4", torch.float32, 1e-4, id="dsv4-f32"),
    pytest.param("cubic", torch.float32, 1e-4, id="cubic-f32"),
    # c = 0 in bf16: PyTorch's CPU bf16 baddbmm ignores alpha=0 (the reference skips it).
    pytest.param("cubic", torch.bfloat16, 3e-2, id="cubic-bf16"),
    pytest.param("you", torch.bfloat16, 6e-2, id="you-bf16"),  # measured ≤ 0.035, 20 seeds
    pytest.param("deepseek_v4", torch.bfloat16, 6e-2, id="dsv4-bf16"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("name, dtype, rtol", IDENTITY_CASES)
def test_output_is_polynomial_of_singular_values(shape, name, dtype, rtol):
    """``newton_schulz(G) = U·diag(p(σ̂))·Vᵀ`` with p the composed scalar polynomial."""
    G = input_for(dtype, shape)
    U, sn, Vh = normalized_svd(G)
    expected = (U * compose(sn, name).unsqueeze(-2)) @ Vh
    X = newton_schulz(G, name, dtype=dtype)
    assert X.shape == G.shape and X.dtype == dtype
    assert rel_fro(X, expected) < rtol


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("steps", [1, 2, 7], ids=lambda s: f"steps{s}")
def test_explicit_coefficients_and_steps(dtype, steps):
    """Custom triples and step counts follow the same identity."""
    coefficients = [(2.0, -1.5, 0.5), (1.875, -1.25, 0.375)]
    G = input_for(dtype, (6, 11))
    U, sn, Vh = normalized_svd(G)
    expected = (U * compose(sn, coefficients, steps).unsqueeze(-2)) @ Vh
    X = newton_schulz(G, coefficients, steps=steps, dtype=dtype)
    assert rel_fro(X, expected) < (1e-10 if dtype == F64 else 1e-5)


def test_polynomial_identity_on_rank_deficient_input():
    """Zero singular values stay zero: a rank-2 5×7 matrix gives 2 non-zero singular values."""
    G = torch.randn(5, 2, dtype=F64) @ torch.randn(2, 7, dtype=F64)
    X = newton_schulz(G, "polar_express", dtype=F64)
    sv = torch.linalg.svdvals(X)
    assert bool(((sv[:2] > 0.855) & (sv[:2] < 1.145)).all())
    assert sv[2:].max().item() < 1e-12
    # And it points along the partial isometry polar_svd returns.
    assert torch.linalg.matrix_norm(X - polar_svd(G)).item() < 0.145 * math.sqrt(2)


# (coefficient set, compute dtype, singular value range for inputs with σ̂ ≥ 1e-3).
RANGE_CASES = [
    pytest.param("classic", torch.bfloat16, 0.45, 1.25, id="classic-bf16"),
    pytest.param("classic", torch.float32, 0.47, 1.21, id="classic-f32"),
    pytest.param("classic", F64, 0.47, 1.21, id="classic-f64"),
    pytest.param("polar_express", torch.bfloat16, 0.80, 1.20, id="pe-bf16"),
    pytest.param("polar_express", torch.float32, 0.855, 1.145, id="pe-f32"),
    pytest.param("polar_express", F64, 0.855, 1.145, id="pe-f64"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("name, dtype, lo, hi", RANGE_CASES)
def test_singular_values_in_coefficient_set_range(shape, name, dtype, lo, hi):
    G = conditioned(shape, cond=10.0, dtype=F64 if dtype == F64 else torch.float32)
    _, sn, _ = normalized_svd(G)
    assert sn.min().item() >= 1e-3  # the range is stated for σ̂ ∈ [1e-3, 1]
    sv = torch.linalg.svdvals(newton_schulz(G, name, dtype=dtype).to(F64))
    assert lo <= sv.min().item() and sv.max().item() <= hi


# (coefficient set, compute dtype, cap on ‖X − U·Vᵀ‖_F / √min(m, n)). The exact distance is
# ‖p(σ̂) − 1‖₂/√k ≤ max|p − 1|: 0.1412 for Polar Express, 0.5295 for classic (rank 1 alone gives
# 1 − p(1) = 0.304), plus the low-precision noise of the identity above.
POLAR_DISTANCE_CASES = [
    pytest.param("classic", torch.bfloat16, 3e-2, 0.56, id="classic-bf16"),
    pytest.param("classic", F64, 1e-10, 0.53, id="classic-f64"),
    pytest.param("polar_express", torch.bfloat16, 0.12, 0.20, id="pe-bf16"),
    pytest.param("polar_express", F64, 1e-10, 0.1412, id="pe-f64"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("name, dtype, rtol, cap", POLAR_DISTANCE_CASES)
def test_distance_to_exact_polar_factor(shape, name, dtype, rtol, cap):
    G = input_for(dtype, shape)
    U, sn, Vh = normalized_svd(G)
    exact = U @ Vh
    assert torch.allclose(polar_svd(G), exact, atol=1e-12, rtol=0)
    k = min(shape[-2:])
    p = compose(sn, name)
    X = newton_schulz(G, name, dtype=dtype).to(F64)
    dist = torch.linalg.matrix_norm(X - exact)
    # Triangle inequality: ‖X − UVᵀ‖ ≤ ‖X − U·p·Vᵀ‖ + ‖p − 1‖₂.
    bound = rtol * torch.linalg.vector_norm(p, dim=-1) + torch.linalg.vector_norm(p - 1, dim=-1)
    assert bool((dist <= bound * (1 + 1e-9)).all())
    assert (dist / math.sqrt(k)).max().item() < cap


# ---------------------------------------------------------------------------------------------
# Structure: transposition, batching, scale, zeros, non-finite values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 9), (7, 129), (33, 65), (3, 16, 40), (2, 1, 5)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_tall_is_transposed_wide(shape, dtype):
    """Tall matrices are oriented wide: newton_schulz(Gᵀ) is newton_schulz(G)ᵀ bit for bit."""
    G = torch.randn(shape)
    wide = newton_schulz(G, dtype=dtype)
    tall = newton_schulz(G.mT, dtype=dtype)
    assert tall.shape == G.mT.shape
    assert torch.equal(tall, wide.mT)
    # A contiguous tall copy is reduced in another memory order: equal up to rounding.
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(newton_schulz(G.mT.contiguous(), dtype=dtype), wide.mT, atol=atol)


@pytest.mark.parametrize("n", [1, 8, 31], ids=lambda n: f"{n}x{n}")
def test_square_transpose_equivariance(n):
    """polar(Gᵀ) = polar(G)ᵀ; a square matrix is not transposed, so this holds to rounding."""
    G = torch.randn(n, n)
    a = newton_schulz(G.mT, "polar_express", dtype=torch.float32)
    b = newton_schulz(G, "polar_express", dtype=torch.float32).mT
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_shape", [(5,), (2, 3)], ids=["5", "2x3"])
@pytest.mark.parametrize("mn", [(16, 40), (40, 16), (9, 9)], ids=_ids)
def test_batch_matches_per_matrix(batch_shape, mn):
    G = torch.randn(*batch_shape, *mn)
    X = newton_schulz(G, dtype=torch.float32)
    flat_in, flat_out = G.reshape(-1, *mn), X.reshape(-1, *mn)
    for g, x in zip(flat_in, flat_out, strict=True):
        # fp32 rounding, amplified by five steps (|b| ≈ 4.8): batched and single products may
        # block the sums differently.
        assert torch.allclose(x, newton_schulz(g, dtype=torch.float32), atol=5e-6, rtol=0)


def test_large_matrices_on_a_cpu_go_one_at_a_time_with_the_same_bits():
    """A stack of matrices too large to batch well on a CPU (``stacks_well``) is iterated one
    matrix at a time: each result is bit for bit that matrix's own Newton–Schulz."""
    from scion_kernels.newton_schulz import stacks_well

    m, n, cpu = 512, 1024, torch.device("cpu")
    assert not stacks_well(cpu, m, n) and stacks_well(cpu, 256, 1024)
    G = torch.randn(2, m, n)
    X = newton_schulz(G, dtype=torch.float32)
    for g, x in zip(G, X, strict=True):
        assert torch.equal(x, newton_schulz(g, dtype=torch.float32))


def test_batch_normalizes_each_matrix_on_its_own():
    """Magnitudes differing by 1e40 and a zero matrix in one batch do not interact."""
    mats = [torch.randn(6, 10) for _ in range(3)]
    G = torch.stack([mats[0], 1e-20 * mats[1], torch.zeros(6, 10), 1e20 * mats[2]])
    X = newton_schulz(G, dtype=torch.float32)
    assert bool(X.isfinite().all())
    assert torch.allclose(X[0], newton_schulz(mats[0], dtype=torch.float32), atol=1e-6)
    assert torch.allclose(X[1], newton_schulz(mats[1], dtype=torch.float32), atol=1e-5)
    assert torch.equal(X[2], torch.zeros(6, 10))
    assert torch.allclose(X[3], newton_schulz(mats[2], dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (7, 5), (2, 3, 4)], ids=_ids)
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, F64], ids=["bf16", "f16", "f32", "f64"]
)
@pytest.mark.parametrize("name", ["classic", "polar_express"])
def test_zero_matrix_gives_exact_zeros(shape, dtype, name):
    X = newton_schulz(torch.zeros(shape), name, dtype=dtype)
    assert X.dtype == dtype and X.shape == shape
    assert not bool(X.isnan().any())
    assert torch.equal(X, torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (3, 0, 5), (0, 2, 2)], ids=_ids)
def test_empty_input(shape):
    X = newton_schulz(torch.randn(shape), dtype=torch.float32)
    assert X.shape == shape and X.dtype == torch.float32


# (scale, compute dtype, atol): no ε floor, so a tiny or huge gradient has the same direction.
SCALE_CASES = [
    pytest.param(1e-30, torch.float32, 1e-5, id="1e-30-f32"),
    pytest.param(1e-20, torch.float32, 1e-5, id="1e-20-f32"),
    pytest.param(1e20, torch.float32, 1e-5, id="1e20-f32"),
    pytest.param(1e30, torch.float32, 1e-5, id="1e30-f32"),
    pytest.param(1e-30, torch.bfloat16, 1e-2, id="1e-30-bf16"),
    pytest.param(1e30, torch.bfloat16, 1e-2, id="1e30-bf16"),
]


@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (1, 5)], ids=_ids)
@pytest.mark.parametrize("scale, dtype, atol", SCALE_CASES)
def test_scale_invariance(shape, scale, dtype, atol):
    G = torch.randn(shape)
    ref = newton_schulz(G, dtype=dtype).float()
    scaled = G * scale
    assert bool(scaled.isfinite().all()) and bool((scaled != 0).all())
    out = newton_schulz(scaled, dtype=dtype).float()
    assert ref.abs().max().item() > 0.1  # not a trivially zero reference
    assert torch.allclose(out, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_subnormal_float32_input(dtype):
    """A float32 gradient of subnormal numbers (≈1e-40) still gives the polar direction."""
    G = torch.randn(7, 13)
    tiny = G * 1e-40
    assert tiny.abs().max().item() < torch.finfo(torch.float32).tiny  # all subnormal
    assert bool((tiny != 0).all())
    ref = newton_schulz(G, dtype=dtype).float()
    out = newton_schulz(tiny, dtype=dtype).float()
    # Subnormals carry fewer mantissa bits (≈ 2⁻¹⁴ relative at 1e-40).
    assert torch.allclose(out, ref, atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


@pytest.mark.parametrize("scale", [1e-60, 1e60], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_float64_input_outside_float32_range(scale, dtype):
    """A finite, non-zero float64 gradient is normalized before any cast to the compute dtype,
    so its magnitude does not matter even where it is outside float32's range."""
    G = torch.randn(7, 13, dtype=F64)
    ref = newton_schulz(G, dtype=dtype).float()
    out = newton_schulz(G * scale, dtype=dtype).float()
    assert bool(out.isfinite().all()), "a finite input gave a non-finite output"
    assert out.abs().max().item() > 0.1, "a non-zero input gave an all-zero output"
    assert torch.allclose(out, ref, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_non_finite_input_gives_non_finite_output(bad, dtype):
    """Documented: a non-finite entry poisons its own matrix, and only that one."""
    G = torch.randn(3, 5, 8)
    G[1, 2, 3] = bad
    X = newton_schulz(G, dtype=dtype)
    assert not bool(X[1].isfinite().any())
    for i in (0, 2):
        assert bool(X[i].isfinite().all())
        # Bitwise in bf16; fp32 batched and single products may block sums differently.
        assert torch.allclose(X[i], newton_schulz(G[i], dtype=dtype), atol=5e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# dtypes and argument errors
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32, F64]
DTYPE_IDS = ["bf16", "f16", "f32", "f64"]


@pytest.mark.parametrize("in_dtype", DTYPES, ids=[f"in-{d}" for d in DTYPE_IDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=[f"compute-{d}" for d in DTYPE_IDS])
def test_dtypes(in_dtype, dtype):
    """Any float input dtype; the output is in the compute dtype and close to the polar form."""
    G = conditioned((6, 10), cond=4.0).to(in_dtype)
    X = newton_schulz(G, "polar_express", dtype=dtype)
    assert X.dtype == dtype and X.shape == G.shape
    U, sn, Vh = normalized_svd(G)
    expected = (U * compose(sn, "polar_express").unsqueeze(-2)) @ Vh
    assert rel_fro(X, expected) < 0.12


@pytest.mark.parametrize("bf16_units", [True, False], ids=["cpu-bf16", "cpu-no-bf16"])
def test_default_compute_dtype_follows_the_hardware(bf16_units, monkeypatch):
    """bf16 on GPUs and on CPUs with bf16 matrix units; float32 on other CPUs, where bf16
    products are emulated (about 100× slower); an explicit dtype always wins."""
    monkeypatch.setattr(ns_module, "_CPU_BF16_MATMUL", bf16_units)
    want = torch.bfloat16 if bf16_units else torch.float32
    assert ns_module.default_compute_dtype("cpu") == want
    assert ns_module.default_compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert newton_schulz(torch.randn(4, 6)).dtype == want
    assert newton_schulz(torch.randn(4, 6), dtype=torch.float16).dtype == torch.float16


def test_cpu_probe_agrees_with_torchs_cpu_capability():
    """A CPU whose best vector unit PyTorch reports as AVX2 (or less) has no bf16 matrix
    instructions; the probe must say so (that CPU's bf16 products are the slow path)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("DEFAULT", "NO AVX", "AVX2"):
        assert not ns_module.cpu_has_bf16_matmul()
    bf16_probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if bf16_probe is not None and bf16_probe():
        assert ns_module.cpu_has_bf16_matmul()


@pytest.mark.parametrize("shape", [(), (5,)], ids=["0d", "1d"])
def test_newton_schulz_rejects_non_matrices(shape):
    with pytest.raises(ValueError, match=r"needs matrices \(\.\.\., m, n\); got shape"):
        newton_schulz(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64], ids=str)
def test_newton_schulz_rejects_bad_compute_dtype(dtype):
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        newton_schulz(torch.randn(4, 6), dtype=dtype)


def test_newton_schulz_rejects_bad_coefficients():
    with pytest.raises(ValueError, match="unknown Newton–Schulz coefficient set"):
        newton_schulz(torch.randn(4, 6), "fast")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        newton_schulz(torch.randn(4, 6), steps=0)


# ---------------------------------------------------------------------------------------------
# polar_svd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (7, 5), (6, 6), (1, 9), (3, 4, 6)], ids=_ids)
def test_polar_svd_is_a_partial_isometry(shape):
    G = torch.randn(shape, dtype=F64)
    P = polar_svd(G)
    assert P.shape == G.shape and P.dtype == F64
    sv = torch.linalg.svdvals(P)
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-12, rtol=0)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(P, U @ Vh, atol=1e-12, rtol=0)
    # The polar factor is the orthogonal matrix closest to G: ⟨G, P⟩ = ‖G‖_nuclear.
    inner = (G * P).sum(dim=(-2, -1))
    assert torch.allclose(inner, torch.linalg.matrix_norm(G, ord="nuc"), rtol=1e-12)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_polar_svd_returns_float64(in_dtype):
    G = torch.randn(4, 9).to(in_dtype)
    P = polar_svd(G)
    assert P.dtype == F64
    U, _, Vh = torch.linalg.svd(G.to(F64), full_matrices=False)
    assert torch.allclose(P, U @ Vh, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 3)], ids=_ids)
def test_polar_svd_zero_matrix(shape):
    P = polar_svd(torch.zeros(shape))
    assert torch.equal(P, torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("mn", [(5, 7), (7, 5)], ids=_ids)
def test_polar_svd_rank_deficient(mn):
    m, n = mn
    G = torch.randn(m, 2, dtype=F64) @ torch.randn(2, n, dtype=F64)
    P = polar_svd(G)
    sv = torch.linalg.svdvals(P)
    assert torch.allclose(sv[:2], torch.ones(2, dtype=F64), atol=1e-10, rtol=0)
    assert sv[2:].max().item() < 1e-10
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(P, U[:, :2] @ Vh[:2], atol=1e-10, rtol=0)


def test_polar_svd_batch_with_mixed_ranks():
    full = torch.randn(5, 7, dtype=F64)
    rank1 = torch.randn(5, 1, dtype=F64) @ torch.randn(1, 7, dtype=F64)
    G = torch.stack([full, rank1, torch.zeros(5, 7, dtype=F64)])
    P = polar_svd(G)
    assert P.shape == (3, 5, 7)
    ranks = (torch.linalg.svdvals(P) > 0.5).sum(-1).tolist()
    assert ranks == [5, 1, 0]
    assert torch.equal(P[2], torch.zeros(5, 7, dtype=F64))
    assert torch.allclose(P[0], polar_svd(full), atol=1e-12, rtol=0)


def test_polar_svd_scale_invariant():
    G = torch.randn(6, 9, dtype=F64)
    for scale in (1e-200, 1e200):
        assert torch.allclose(polar_svd(G * scale), polar_svd(G), atol=1e-12, rtol=0)


def test_polar_svd_empty():
    assert polar_svd(torch.randn(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("shape", [(), (5,)], ids=["0d", "1d"])
def test_polar_svd_rejects_non_matrices(shape):
    with pytest.raises(ValueError, match=r"polar_svd needs matrices"):
        polar_svd(torch.randn(shape))


def test_describe_cpu_names_the_vector_unit():
    """Results name the CPU with the unit its timings depend on (AVX2 vs AVX512 + bf16)."""
    text = ns_module.describe_device("cpu")
    unit = torch.backends.cpu.get_cpu_capability()
    assert text.endswith(f"{unit}{' + bf16' if ns_module.cpu_has_bf16_matmul() else ''})")
    assert " cores, " in text


# ---------------------------------------------------------------------------------------------
# Gram Newton–Schulz (gram=True, Spectral(polar="gram"))
# ---------------------------------------------------------------------------------------------

GRAM_SHAPES = [(1, 1), (1, 9), (9, 1), (7, 7), (7, 129), (129, 7), (33, 65), (8, 4097),
               (3, 16, 40), (2, 1, 5), (5, 12, 24)]  # fmt: skip


@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=_ids)
@pytest.mark.parametrize("name", ["classic", "polar_express"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8], ids=lambda s: f"steps{s}")
def test_gram_is_the_same_iteration_in_float64(shape, name, steps):
    """In float64 the Gram form computes the plain iteration's result (to rounding), for every
    step count, so across any number of restarts; matrices squarer than ``n = 2m`` take the
    plain iteration itself."""
    from scion_kernels.newton_schulz import orient, uses_gram

    G = torch.randn(shape, dtype=F64)
    plain = newton_schulz(G, name, steps=steps, dtype=F64)
    gram = newton_schulz(G, name, steps=steps, dtype=F64, gram=True)
    assert gram.shape == G.shape and gram.dtype == F64
    if uses_gram(*orient(*shape[-2:])[:2], resolve_coefficients(name, steps), F64):
        assert rel_fro(gram, plain) < 1e-10
    else:
        assert torch.equal(gram, plain)


def test_gram_large_matrices_on_a_cpu_go_one_at_a_time_with_the_same_bits():
    """The Gram form, like the plain one, iterates matrices too large to stack well on a CPU
    one at a time: each result is bit for bit that matrix's own."""
    G = torch.randn(3, 256, 2048)
    X = newton_schulz(G, dtype=torch.float32, gram=True)
    for g, x in zip(G, X, strict=True):
        assert torch.equal(x, newton_schulz(g, dtype=torch.float32, gram=True))


@pytest.mark.parametrize("shape", [(7, 129), (129, 7), (8, 4097), (64, 256), (3, 16, 40)], ids=_ids)
@pytest.mark.parametrize("cond", [10.0, 1e3, 1e5], ids=lambda c: f"cond{c:g}")
def test_gram_bf16_accuracy(shape, cond):
    """In bf16 the Gram form's result is the composed polynomial of the singular values to
    within a few hundredths, across condition numbers (the restarts keep the small singular
    values ``R = X·Xᵀ`` squares below bf16's resolution), on fresh inputs. Its distance to the
    exact polar factor is the plain iteration's; its distance to the exact polynomial is at most
    about four times the plain iteration's (measured worst 4.1× at condition 10, bench/NOTES.md).
    """
    for _ in range(3):
        G = conditioned(shape, cond)
        U, sn, Vh = normalized_svd(G)
        want = compose(sn, "classic")
        expected = (U * want.unsqueeze(-2)) @ Vh
        plain = newton_schulz(G, dtype=torch.bfloat16)
        gram = newton_schulz(G, dtype=torch.bfloat16, gram=True)
        assert gram.dtype == torch.bfloat16 and gram.shape == G.shape
        err_plain, err_gram = rel_fro(plain, expected), rel_fro(gram, expected)
        assert err_gram < max(8 * err_plain, err_plain + 0.02), (err_gram, err_plain)
        # Each singular direction's output against the polynomial of its singular value.
        got = torch.diagonal(U.mT @ gram.to(F64) @ Vh.mT, dim1=-2, dim2=-1)
        assert (got - want).abs().max().item() < 0.2
        exact = polar_svd(G)
        assert rel_fro(gram, exact) < 1.1 * rel_fro(plain, exact) + 0.01


@pytest.mark.parametrize("shape", [(7, 33), (16, 40), (64, 256), (2, 32, 128)], ids=_ids)
@pytest.mark.parametrize("cond", [10.0, 1e3, 1e5], ids=lambda c: f"cond{c:g}")
def test_gram_fp16_restarts_every_third_step(shape, cond):
    """fp16 restarts every 3 steps (one restart in 5), and is still closer to the composed
    polynomial than the plain iteration in bf16: each singular direction within 0.06 of it
    (measured worst 0.033 over 30 draws, against bf16's plain 0.12, bench/NOTES.md), and the
    float64 Gram form with any restart period is the plain iteration."""
    from scion_kernels.newton_schulz import gram_restart_every

    assert gram_restart_every(torch.float16) == 3
    assert gram_restart_every(torch.bfloat16) == gram_restart_every(torch.float32) == 2
    for _ in range(3):
        G = conditioned(shape, cond)
        U, sn, Vh = normalized_svd(G)
        want = compose(sn, "classic")
        gram = newton_schulz(G, dtype=torch.float16, gram=True)
        assert gram.dtype == torch.float16 and gram.shape == G.shape
        got = torch.diagonal(U.mT @ gram.to(F64) @ Vh.mT, dim1=-2, dim2=-1)
        assert (got - want).abs().max().item() < 0.06
        exact = polar_svd(G)
        plain = newton_schulz(G, dtype=torch.float16)
        assert rel_fro(gram, exact) < 1.1 * rel_fro(plain, exact) + 0.01


@pytest.mark.parametrize("shape", [(1, 4), (5, 12), (12, 5), (2, 3, 9)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_gram_zero_and_non_finite(shape, dtype):
    """A zero matrix gives exact zeros; a non-finite entry gives non-finite output."""
    X = newton_schulz(torch.zeros(shape), dtype=dtype, gram=True)
    assert X.dtype == dtype and not X.any()
    G = torch.randn(shape)
    G[..., 0, 0] = float("nan")
    assert not newton_schulz(G, dtype=dtype, gram=True).isfinite().all()


def test_gram_refuses_coefficients_that_cancel_too_much_for_the_dtype():
    """Polar Express's first step (|b| + |c| = 38.4) in bf16 takes the plain iteration, bit for
    bit (in the Gram form it diverged on a 7×129 matrix); in fp16 it takes the Gram form, whose
    result is the composed polynomial of the singular values to within a few hundredths."""
    from scion_kernels.newton_schulz import gram_refusal

    table = resolve_coefficients("polar_express")
    assert "38.4" in gram_refusal(table, torch.bfloat16)
    assert gram_refusal(table, torch.float16) is None
    assert gram_refusal(resolve_coefficients("classic"), torch.bfloat16) is None
    G = conditioned((7, 129), 1e3)
    plain = newton_schulz(G, "polar_express", dtype=torch.bfloat16)
    assert torch.equal(newton_schulz(G, "polar_express", dtype=torch.bfloat16, gram=True), plain)
    U, sn, Vh = normalized_svd(G)
    want = compose(sn, "polar_express")
    gram = newton_schulz(G, "polar_express", dtype=torch.float16, gram=True)
    assert not torch.equal(gram, newton_schulz(G, "polar_express", dtype=torch.float16))
    got = torch.diagonal(U.mT @ gram.to(F64) @ Vh.mT)
    assert (got - want).abs().max().item() < 0.1
