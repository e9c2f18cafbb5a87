"""Each norm's LMO and init against its formula (docs/math.md §2–3), written out in float64 here."""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch

from scion_kernels.newton_schulz import newton_schulz
from scion_kernels.norms import (
    NORMS,
    Auto,
    BiasRMS,
    ColNorm,
    Norm,
    RowNorm,
    Sign,
    Spectral,
    SpectralConv,
    describe_misfit,
    make_norm,
    norms_that_fit,
    random_orthogonal,
    shared_draws,
)

F64 = torch.float64
EPS = 1e-8

SHAPES = [(1, 1), (1, 9), (9, 1), (7, 13), (13, 7), (5, 129)]

# (input dtype, atol, rtol) of an LMO against its float64 formula. fp32 and bf16 inputs are
# exactly representable in float64, so the only error is the LMO's float32 arithmetic.
DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="f32"),
    pytest.param(torch.bfloat16, 1e-6, 1e-5, id="bf16"),
    pytest.param(F64, 1e-12, 1e-12, id="f64"),
]

# The submodule (the package attribute of that name is the function).
ns_module = importlib.import_module("scion_kernels.newton_schulz")


def _ids(shape):
    return "x".join(map(str, shape)) if shape else "scalar"


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def exact_polar(g: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ of a full-rank matrix (batch), from a float64 SVD."""
    U, _, Vh = torch.linalg.svd(g.to(F64), full_matrices=False)
    return U @ Vh


def assert_close(got, want, atol, rtol):
    assert got.shape == want.shape
    assert torch.allclose(got.to(F64), want.to(F64), atol=atol, rtol=rtol), (
        f"max abs diff {(got.to(F64) - want.to(F64)).abs().max().item():.3e}"
    )


# ---------------------------------------------------------------------------------------------
# Spectral
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_spectral_svd_formula(shape, dtype, atol, rtol):
    g = torch.randn(shape, dtype=F64).to(dtype)
    d_out, d_in = shape
    out = Spectral(polar="svd").lmo(g)
    assert out.dtype == F64  # the exact polar factor is float64
    assert_close(out, math.sqrt(d_out / d_in) * exact_polar(g), 1e-12, 1e-12)


@pytest.mark.parametrize("shape", [(4, 16), (16, 4), (6, 6)], ids=_ids)
@pytest.mark.parametrize(
    "options, scale",
    [
        pytest.param({}, lambda o, i: math.sqrt(o / i), id="default"),
        pytest.param({"normalized": False}, lambda o, i: math.sqrt(o), id="unnormalized"),
        pytest.param({"max": True}, lambda o, i: max(1.0, math.sqrt(o / i)), id="max"),
        pytest.param(
            {"max": True, "normalized": False},
            lambda o, i: max(1.0, math.sqrt(o)),
            id="max-unnormalized",
        ),
    ],
)
def test_spectral_scale_options(shape, options, scale):
    g = torch.randn(shape, dtype=F64)
    norm = Spectral(polar="svd", **options)
    s = scale(*shape)
    assert norm.scale_for(shape) == pytest.approx(s, rel=1e-15)
    assert_close(norm.lmo(g), s * exact_polar(g), 1e-12, 1e-12)


@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 7, 5), (2, 2, 4, 4)], ids=_ids)
def test_spectral_batch_dims(shape):
    """batch_dims: each matrix is orthogonalized and scaled on its own."""
    g = torch.randn(shape, dtype=F64)
    batch_dims = len(shape) - 2
    d_out, d_in = shape[-2:]
    out = Spectral(polar="svd", batch_dims=batch_dims).lmo(g)
    assert out.shape == shape
    assert_close(out, math.sqrt(d_out / d_in) * exact_polar(g), 1e-12, 1e-12)
    # Newton–Schulz too: the batched result is the per-matrix one.
    ns = Spectral(ns_dtype=torch.float32, batch_dims=batch_dims).lmo(g.float())
    single = Spectral(ns_dtype=torch.float32)
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in shape[:batch_dims]]).reshape(
        -1, batch_dims
    ):
        i = tuple(idx.tolist())
        assert torch.allclose(ns[i], single.lmo(g.float()[i]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bf16_units", [True, False], ids=["cpu-bf16", "cpu-no-bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=["f32", "bf16", "f64"])
def test_spectral_newton_schulz_default(shape, dtype, bf16_units, monkeypatch):
    """The default LMO is s·newton_schulz(g) (classic, 5 steps) in the compute dtype the CPU
    runs well (bf16 with bf16 matrix units, else float32), returned in float32."""
    monkeypatch.setattr(ns_module, "_CPU_BF16_MATMUL", bf16_units)
    g = torch.randn(shape, dtype=F64).to(dtype)
    d_out, d_in = shape
    norm = Spectral()
    compute = torch.bfloat16 if bf16_units else torch.float32
    assert norm.ns_dtype is None and norm.compute_dtype(g.device) == compute
    out = norm.lmo(g)
    assert out.dtype == work_dtype(dtype)
    want = math.sqrt(d_out / d_in) * newton_schulz(g, "classic", 5, compute).to(F64)
    assert_close(out, want, 1e-6, 1e-6)


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float16, torch.float32, F64], ids=str)
@pytest.mark.parametrize("bf16_units", [True, False], ids=["cpu-bf16", "cpu-no-bf16"])
def test_explicit_ns_dtype_wins(ns_dtype, bf16_units, monkeypatch):
    monkeypatch.setattr(ns_module, "_CPU_BF16_MATMUL", bf16_units)
    g = torch.randn(6, 10)
    norm = Spectral(ns_dtype=ns_dtype)
    assert norm.compute_dtype("cpu") == ns_dtype == norm.compute_dtype("cuda")
    want = math.sqrt(6 / 10) * newton_schulz(g, "classic", 5, ns_dtype).to(F64)
    assert_close(norm.lmo(g), want, 1e-6, 1e-6)


def test_spectral_passes_newton_schulz_options():
    g = torch.randn(9, 20)
    norm = Spectral(coefficients="polar_express", steps=3, ns_dtype=F64)
    out = norm.lmo(g)
    assert out.dtype == F64
    want = math.sqrt(9 / 20) * newton_schulz(g, "polar_express", 3, F64)
    assert torch.allclose(out, want, atol=1e-14, rtol=0)
    custom = Spectral(coefficients=[(1.5, -0.5, 0.0)], ns_dtype=torch.float32).lmo(g)
    want = math.sqrt(9 / 20) * newton_schulz(g, [(1.5, -0.5, 0.0)], dtype=torch.float32)
    assert torch.allclose(custom, want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=["f64", "bf16"])
def test_spectral_polar_gram(dtype):
    """``polar="gram"``: matrices at least twice as wide (or tall) as the other way take the
    Gram form of Newton–Schulz, squarer ones the plain iteration, bit for bit as
    :func:`newton_schulz` with ``gram=True`` computes them; batches, conv kernels and tall and
    wide matrices sharing a stack included."""
    norm = Spectral(polar="gram", ns_dtype=dtype)
    gs = [torch.randn(16, 48), torch.randn(48, 16), torch.randn(16, 24), torch.randn(20, 20)]
    for g, out in zip(gs, norm.lmo_many(gs), strict=True):
        want = newton_schulz(g, dtype=dtype, gram=True).to(out.dtype)
        want = want * math.sqrt(g.shape[0] / g.shape[1])
        if dtype == F64:
            assert torch.equal(out, want)
        else:  # a stack of two against one matrix: bf16 products may round differently
            torch.testing.assert_close(out, want, rtol=2**-7, atol=1e-6)
    plain = Spectral(ns_dtype=dtype)
    assert torch.equal(norm.lmo(gs[2]), plain.lmo(gs[2]))
    assert not torch.equal(norm.lmo(gs[0]), plain.lmo(gs[0]))
    conv = torch.randn(8, 4, 3, 3)  # flattened 8×36
    got = SpectralConv(polar="gram", ns_dtype=dtype).lmo(conv)
    want = newton_schulz(conv.reshape(8, -1), dtype=dtype, gram=True).to(got.dtype)
    assert torch.equal(got, want.reshape(conv.shape) * (math.sqrt(8 / 4) / 9))


# ---------------------------------------------------------------------------------------------
# SpectralConv
# ---------------------------------------------------------------------------------------------

CONV_SHAPES = [(8, 3, 5), (8, 3, 3, 3), (4, 2, 3, 1), (16, 2, 3), (2, 3, 2, 2, 2)]
CONV_IDS = ["conv1d", "conv2d", "conv2d-3x1", "conv1d-tall", "conv3d"]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=CONV_IDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_spectral_conv_svd_formula(shape, dtype, atol, rtol):
    g = torch.randn(shape, dtype=F64).to(dtype)
    d_out, d_in, *kernel = shape
    factor = math.sqrt(d_out / d_in) / math.prod(kernel)
    want = factor * exact_polar(g.reshape(d_out, -1)).reshape(shape)
    assert_close(SpectralConv(polar="svd").lmo(g), want, 1e-12, 1e-12)


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=CONV_IDS)
def test_spectral_conv_newton_schulz(shape):
    g = torch.randn(shape)
    d_out, d_in, *kernel = shape
    factor = math.sqrt(d_out / d_in) / math.prod(kernel)
    want = factor * newton_schulz(g.reshape(d_out, -1), dtype=torch.float32).reshape(shape)
    out = SpectralConv(ns_dtype=torch.float32).lmo(g)
    assert out.dtype == torch.float32
    assert torch.allclose(out, want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("scale", [1e-60, 1e60], ids=lambda s: f"{s:g}")
def test_spectral_float64_gradient_outside_float32_range(scale):
    """A float64 gradient far outside float32's range keeps its direction (bf16
    Newton–Schulz): no underflow to a zero update, no overflow to NaN."""
    g = torch.randn(7, 13, dtype=F64)
    ref = Spectral(ns_dtype=torch.bfloat16).lmo(g)
    out = Spectral(ns_dtype=torch.bfloat16).lmo(g * scale)
    assert bool(out.isfinite().all()), "a finite gradient gave a non-finite LMO"
    assert out.abs().max().item() > 0.1, "a non-zero gradient gave a zero LMO"
    assert torch.allclose(out, ref, atol=1e-2, rtol=0)


def test_spectral_conv_channels_last():
    """A channels-last weight flattens like its contiguous copy."""
    g = torch.randn(8, 3, 3, 3)
    cl = g.to(memory_format=torch.channels_last)
    norm = SpectralConv(polar="svd")
    assert torch.allclose(norm.lmo(cl), norm.lmo(g), atol=1e-14, rtol=0)


# ---------------------------------------------------------------------------------------------
# Sign
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "unnormalized"])
def test_sign_formula(shape, dtype, atol, rtol, normalized):
    g = torch.randn(shape, dtype=F64).to(dtype)
    g.view(-1)[::3] = 0  # some exact zeros: sign(0) = 0
    out = Sign(normalized=normalized).lmo(g)
    assert out.dtype == work_dtype(dtype)
    want = torch.sign(g.to(F64)) / (shape[1] if normalized else 1)
    assert torch.equal(out.to(F64), want.to(out.dtype).to(F64))
    assert bool((out.view(-1)[::3] == 0).all())


def test_sign_batch_dims():
    g = torch.randn(3, 5, 7)
    out = Sign(batch_dims=1).lmo(g)
    assert torch.equal(out, torch.sign(g) / 7)
    for i in range(3):
        assert torch.equal(out[i], Sign().lmo(g[i]))


# ---------------------------------------------------------------------------------------------
# ColNorm and RowNorm
# ---------------------------------------------------------------------------------------------


def colnorm_formula(g, normalized, transpose, eps=EPS):
    """g[:, j] / (‖g[:, j]‖₂/√d_out · (d_in if normalized) + ε), on gᵀ when transposed."""
    g = g.to(F64)
    m = g.mT if transpose else g
    d_out, d_in = m.shape[-2:]
    div = m.pow(2).sum(dim=-2, keepdim=True).sqrt() / math.sqrt(d_out)
    if normalized:
        div = div * d_in
    out = m / (div + eps)
    return out.mT if transpose else out


def rownorm_formula(g, normalized, transpose, eps=EPS):
    """g[i, :] / (‖g[i, :]‖₂ · (√d_in if normalized) + ε), on gᵀ when transposed."""
    g = g.to(F64)
    m = g.mT if transpose else g
    d_in = m.shape[-1]
    div = m.pow(2).sum(dim=-1, keepdim=True).sqrt()
    if normalized:
        div = div * math.sqrt(d_in)
    out = m / (div + eps)
    return out.mT if transpose else out


FLAGS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="normalized"),
    pytest.param(False, True, id="transpose"),
    pytest.param(True, True, id="normalized-transpose"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("normalized, transpose", FLAGS)
@pytest.mark.parametrize(
    "cls, formula",
    [(ColNorm, colnorm_formula), (RowNorm, rownorm_formula)],
    ids=["colnorm", "rownorm"],
)
def test_col_and_row_norm_formulas(cls, formula, shape, dtype, atol, rtol, normalized, transpose):
    g = torch.randn(shape, dtype=F64).to(dtype)
    out = cls(normalized=normalized, transpose=transpose).lmo(g)
    assert out.dtype == work_dtype(dtype)
    assert_close(out, formula(g, normalized, transpose), atol, rtol)


def test_colnorm_rownorm_defaults():
    """The authors' defaults: ColNorm unnormalized, RowNorm normalized, neither transposed."""
    g = torch.randn(6, 10, dtype=F64)
    assert_close(ColNorm().lmo(g), colnorm_formula(g, False, False), 1e-12, 1e-12)
    assert_close(RowNorm().lmo(g), rownorm_formula(g, True, False), 1e-12, 1e-12)


@pytest.mark.parametrize("cls, formula", [(ColNorm, colnorm_formula), (RowNorm, rownorm_formula)])
def test_eps_enters_the_divisor(cls, formula):
    """With a gradient of the size of ε, ε is visibly added to the (scaled) norm."""
    g = 1e-4 * torch.randn(5, 8, dtype=F64)
    out = cls(eps=1e-3).lmo(g)
    want = formula(g, cls().normalized, False, eps=1e-3)
    assert_close(out, want, 1e-14, 1e-12)
    # ε is added after the normalized scaling, not before it.
    assert not torch.allclose(out, formula(g, cls().normalized, False, eps=1e-8), rtol=1e-2)


@pytest.mark.parametrize("cls, formula", [(ColNorm, colnorm_formula), (RowNorm, rownorm_formula)])
@pytest.mark.parametrize("transpose", [False, True], ids=["plain", "transpose"])
def test_col_row_norm_batch_dims(cls, formula, transpose):
    g = torch.randn(3, 5, 7, dtype=F64)
    norm = cls(transpose=transpose, batch_dims=1)
    out = norm.lmo(g)
    for i in range(3):
        assert_close(out[i], formula(g[i], norm.normalized, transpose), 1e-12, 1e-12)


def test_colnorm_zero_column_stays_zero():
    g = torch.randn(4, 6)
    g[:, 2] = 0
    out = ColNorm().lmo(g)
    assert torch.equal(out[:, 2], torch.zeros(4))
    assert bool(out.isfinite().all())


def test_rownorm_zero_row_stays_zero():
    g = torch.randn(4, 6)
    g[1] = 0
    out = RowNorm().lmo(g)
    assert torch.equal(out[1], torch.zeros(6))
    assert bool(out.isfinite().all())


# ---------------------------------------------------------------------------------------------
# BiasRMS
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (1,), (), (1, 5, 3), (4, 6)], ids=_ids)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_bias_rms_formula(shape, dtype, atol, rtol):
    g = torch.randn(shape, dtype=F64).to(dtype)
    gd = g.to(F64)
    want = gd / (gd.pow(2).mean().sqrt() + EPS)
    out = BiasRMS().lmo(g)
    assert out.dtype == work_dtype(dtype)
    assert_close(out, want, atol, rtol)


def test_bias_rms_position_embedding_is_not_a_sign():
    """A (1, N, D) position embedding is normalized over all elements, not per dim-0 slice
    (which would make every element ±1)."""
    g = torch.randn(1, 5, 3, dtype=F64)
    out = BiasRMS().lmo(g)
    assert not torch.allclose(out.abs(), torch.ones_like(out))
    assert out.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-7)
    assert torch.allclose(out / g, (out / g).flatten()[0].expand_as(g), rtol=1e-14)


def test_bias_rms_eps():
    g = 1e-4 * torch.randn(9, dtype=F64)
    want = g / (g.pow(2).mean().sqrt() + 1e-3)
    assert_close(BiasRMS(eps=1e-3).lmo(g), want, 1e-14, 1e-12)


# ---------------------------------------------------------------------------------------------
# Auto
# ---------------------------------------------------------------------------------------------


def test_auto_routes_by_ndim():
    auto = Auto()
    assert isinstance(auto.pick((5, 7)), Spectral) and not isinstance(
        auto.pick((5, 7)), SpectralConv
    )
    assert isinstance(auto.pick((8, 3, 3, 3)), SpectralConv)
    assert isinstance(auto.pick((8, 3, 5)), SpectralConv)
    assert isinstance(auto.pick((7,)), BiasRMS)
    assert isinstance(auto.pick(()), BiasRMS)
    g2, g4, g1 = torch.randn(5, 7), torch.randn(8, 3, 3, 3), torch.randn(7)
    assert torch.equal(auto.lmo(g2), Spectral().lmo(g2))
    assert torch.equal(auto.lmo(g4), SpectralConv().lmo(g4))
    assert torch.equal(auto.lmo(g1), BiasRMS().lmo(g1))
    s = torch.tensor(-3.0)
    assert torch.equal(auto.lmo(s), BiasRMS().lmo(s))


def test_auto_passes_newton_schulz_options():
    g2, g4 = torch.randn(12, 20), torch.randn(8, 3, 3, 3)
    auto = Auto(coefficients="polar_express", ns_dtype=torch.float32)
    spectral = Spectral(coefficients="polar_express", ns_dtype=torch.float32)
    conv = SpectralConv(coefficients="polar_express", ns_dtype=torch.float32)
    assert torch.equal(auto.lmo(g2), spectral.lmo(g2))
    assert torch.equal(auto.lmo(g4), conv.lmo(g4))
    # …and they matter: the default (classic, bf16) result is different.
    assert not torch.allclose(auto.lmo(g2), Auto().lmo(g2), atol=1e-3)


def test_auto_passes_eps_to_bias_rms():
    g = 1e-4 * torch.randn(9)
    out = Auto(eps=1e-3).lmo(g)
    assert torch.equal(out, BiasRMS(eps=1e-3).lmo(g))
    assert not torch.allclose(out, BiasRMS().lmo(g), rtol=1e-2)


def test_auto_passes_spectral_only_options():
    """An option only Spectral takes (max) reaches Spectral; the conv path is unaffected."""
    g2, g4 = torch.randn(4, 16, dtype=F64), torch.randn(8, 3, 3, dtype=F64)
    auto = Auto(max=True, polar="svd")
    assert torch.equal(auto.lmo(g2), Spectral(max=True, polar="svd").lmo(g2))
    assert_close(auto.lmo(g2), exact_polar(g2), 1e-12, 1e-12)  # s = max(1, 1/2) = 1
    assert torch.equal(auto.lmo(g4), SpectralConv(polar="svd").lmo(g4))


def test_auto_lmo_many_mixed():
    gs = [torch.randn(5, 7), torch.randn(3), torch.randn(8, 3, 3, 3), torch.randn(7, 5)]
    auto = Auto(ns_dtype=torch.float32)
    many = auto.lmo_many(gs)
    for g, out in zip(gs, many, strict=True):
        assert torch.allclose(out, auto.lmo(g), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param({"batch_dims": 1}, "batch_dims", id="batch_dims"),
        pytest.param({"foo": 1}, "foo", id="unknown"),
        pytest.param({"transpose": True}, "transpose", id="colnorm-option"),
    ],
)
def test_auto_rejects_options(options, match):
    with pytest.raises(ValueError, match=match):
        Auto(**options)


# ---------------------------------------------------------------------------------------------
# Dual norm: ⟨g, lmo(g)⟩ is the dual norm of g; the LMO lies on the unit sphere
# ---------------------------------------------------------------------------------------------


def _nuclear(g):
    return torch.linalg.svdvals(g).sum().item()


# (id, norm, dual norm of g in float64, relative tolerance)
DUAL_CASES = [
    pytest.param(
        Spectral(polar="svd"),
        lambda g: math.sqrt(g.shape[0] / g.shape[1]) * _nuclear(g),
        1e-12,
        id="spectral",
    ),
    pytest.param(
        Spectral(polar="svd", normalized=False),
        lambda g: math.sqrt(g.shape[0]) * _nuclear(g),
        1e-12,
        id="spectral-unnormalized",
    ),
    pytest.param(Sign(), lambda g: g.abs().sum().item() / g.shape[1], 1e-12, id="sign"),
    pytest.param(
        Sign(normalized=False), lambda g: g.abs().sum().item(), 1e-12, id="sign-unnormalized"
    ),
    pytest.param(
        ColNorm(),
        lambda g: (g.norm(dim=0) * math.sqrt(g.shape[0])).sum().item(),
        1e-6,
        id="colnorm",
    ),
    pytest.param(
        ColNorm(normalized=True),
        lambda g: (g.norm(dim=0) * math.sqrt(g.shape[0])).sum().item() / g.shape[1],
        1e-6,
        id="colnorm-normalized",
    ),
    pytest.param(
        ColNorm(transpose=True),
        lambda g: (g.norm(dim=1) * math.sqrt(g.shape[1])).sum().item(),
        1e-6,
        id="colnorm-transpose",
    ),
    pytest.param(
        RowNorm(),
        lambda g: g.norm(dim=1).sum().item() / math.sqrt(g.shape[1]),
        1e-6,
        id="rownorm",
    ),
    pytest.param(
        RowNorm(normalized=False), lambda g: g.norm(dim=1).sum().item(), 1e-6, id="rownorm-unnorm"
    ),
    pytest.param(BiasRMS(), lambda g: math.sqrt(g.numel()) * g.norm().item(), 1e-6, id="biasrms"),
]


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 13), (13, 7)], ids=_ids)
@pytest.mark.parametrize("norm, dual, rtol", DUAL_CASES)
def test_dual_norm_identity(shape, norm, dual, rtol):
    g = torch.randn(shape, dtype=F64)
    inner = (g * norm.lmo(g)).sum().item()
    assert inner > 0
    assert inner == pytest.approx(dual(g), rel=rtol)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 13), (13, 7)], ids=_ids)
def test_lmo_lies_on_the_unit_sphere(shape):
    g = torch.randn(shape, dtype=F64)
    d_out, d_in = shape
    # Spectral: ‖lmo‖_op = s.
    s = math.sqrt(d_out / d_in)
    assert torch.linalg.matrix_norm(Spectral(polar="svd").lmo(g), ord=2).item() == (
        pytest.approx(s, rel=1e-12)
    )
    # Sign: every entry is ±1/d_in.
    assert torch.equal(Sign().lmo(g).abs(), torch.full(shape, 1 / d_in, dtype=F64))
    # ColNorm: every column has RMS 1 (1/d_in when normalized).
    for normalized, target in ((False, 1.0), (True, 1.0 / d_in)):
        rms = ColNorm(normalized=normalized).lmo(g).pow(2).mean(dim=0).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, target), rtol=1e-7, atol=0)
    # RowNorm: every row has ℓ2 norm 1/√d_in (1 when not normalized).
    for normalized, target in ((True, 1 / math.sqrt(d_in)), (False, 1.0)):
        norms = RowNorm(normalized=normalized).lmo(g).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, target), rtol=1e-7, atol=0)
    # BiasRMS: RMS 1.
    assert BiasRMS().lmo(g).pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-7)


# ---------------------------------------------------------------------------------------------
# Zero gradients
# ---------------------------------------------------------------------------------------------

ZERO_CASES = [
    pytest.param(Spectral(ns_dtype=torch.bfloat16), (5, 7), id="spectral-ns-bf16"),
    pytest.param(Spectral(), (5, 7), id="spectral-ns-default"),
    pytest.param(Spectral(ns_dtype=torch.float32, coefficients="polar_express"), (7, 5), id="ns32"),
    pytest.param(Spectral(polar="svd"), (5, 7), id="spectral-svd"),
    pytest.param(Spectral(batch_dims=1), (3, 5, 7), id="spectral-batch"),
    pytest.param(Spectral(polar="svd", batch_dims=1), (3, 7, 5), id="spectral-svd-batch"),
    pytest.param(SpectralConv(), (8, 3, 3, 3), id="conv-ns"),
    pytest.param(SpectralConv(polar="svd"), (8, 3, 5), id="conv-svd"),
    pytest.param(Sign(), (5, 7), id="sign"),
    pytest.param(ColNorm(), (5, 7), id="colnorm"),
    pytest.param(ColNorm(normalized=True, transpose=True), (5, 7), id="colnorm-nt"),
    pytest.param(RowNorm(), (5, 7), id="rownorm"),
    pytest.param(RowNorm(normalized=False, transpose=True), (5, 7), id="rownorm-ut"),
    pytest.param(BiasRMS(), (7,), id="biasrms"),
    pytest.param(BiasRMS(), (), id="biasrms-scalar"),
    pytest.param(Auto(), (8, 3, 3, 3), id="auto-conv"),
    pytest.param(Auto(), (5, 7), id="auto-2d"),
    pytest.param(Auto(), (7,), id="auto-1d"),
]


@pytest.mark.parametrize("norm, shape", ZERO_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_zero_gradient_gives_zero(norm, shape, dtype):
    out = norm.lmo(torch.zeros(shape, dtype=dtype))
    assert out.shape == shape
    assert not bool(out.isnan().any())
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# lmo_many
# ---------------------------------------------------------------------------------------------

MANY_SHAPES = [(16, 48), (48, 16), (16, 48), (7, 13), (13, 7), (5, 5), (1, 9), (9, 1)]


# (norm, atol): 0 means bit-identical. Batching concatenates tall matrices (transposed views)
# with wide ones into one contiguous tensor, so reductions over a transposed operand run in
# another memory order than in the single call: equal to float32 rounding, not bit for bit
# (Newton–Schulz amplifies a last-bit difference in its input to ≈ 1e-6 after 5 steps).
LMO_MANY_CASES = [
    pytest.param(Spectral(ns_dtype=torch.float32), 5e-6, id="spectral-ns32"),
    pytest.param(Spectral(polar="svd"), 1e-12, id="spectral-svd"),
    pytest.param(Spectral(ns_dtype=torch.bfloat16), 2e-2, id="spectral-bf16"),
    pytest.param(Sign(), 0, id="sign"),
    pytest.param(ColNorm(), 0, id="colnorm"),
    pytest.param(ColNorm(normalized=True), 0, id="colnorm-n"),
    pytest.param(ColNorm(normalized=True, transpose=True), 1e-6, id="colnorm-nt"),
    pytest.param(RowNorm(), 0, id="rownorm"),
    pytest.param(RowNorm(normalized=False), 0, id="rownorm-u"),
    pytest.param(RowNorm(transpose=True), 1e-6, id="rownorm-t"),
    pytest.param(BiasRMS(), 0, id="biasrms"),
]


@pytest.mark.parametrize("norm, atol", LMO_MANY_CASES)
def test_lmo_many_equals_lmo(norm, atol):
    gs = [torch.randn(shape) for shape in MANY_SHAPES]
    gs.append(torch.randn(16, 48).to(torch.bfloat16))  # same shape, another dtype
    gs.append(torch.randn(48, 16, dtype=F64))
    many = norm.lmo_many(gs)
    assert len(many) == len(gs)
    for g, out in zip(gs, many, strict=True):
        one = norm.lmo(g)
        assert out.shape == g.shape and out.dtype == one.dtype
        if atol == 0:
            assert torch.equal(out, one)
        else:
            assert torch.allclose(out, one, atol=atol, rtol=0)


def test_spectral_lmo_many_tall_and_wide_share_a_batch():
    """A (16, 48) and a (48, 16) gradient are orthogonalized together, each correctly."""
    a, b = torch.randn(16, 48, dtype=F64), torch.randn(48, 16, dtype=F64)
    out_a, out_b = Spectral(polar="svd").lmo_many([a, b])
    assert_close(out_a, math.sqrt(16 / 48) * exact_polar(a), 1e-12, 1e-12)
    assert_close(out_b, math.sqrt(48 / 16) * exact_polar(b), 1e-12, 1e-12)


def test_spectral_lmo_many_batch_dims_mixed():
    gs = [torch.randn(2, 16, 48), torch.randn(3, 48, 16), torch.randn(2, 16, 48)]
    norm = Spectral(ns_dtype=torch.float32, batch_dims=1)
    for g, out in zip(gs, norm.lmo_many(gs), strict=True):
        assert torch.allclose(out, norm.lmo(g), atol=5e-6, rtol=0)


@pytest.mark.parametrize("norm", [Spectral(), Sign(), ColNorm(), RowNorm(), BiasRMS(), Auto()])
def test_lmo_many_empty_list(norm):
    assert norm.lmo_many([]) == []


def test_lmo_does_not_modify_its_input():
    g = torch.randn(6, 9)
    keep = g.clone()
    for norm in (Spectral(), Spectral(polar="svd"), Sign(), ColNorm(), RowNorm(), BiasRMS()):
        norm.lmo_many([g, g])
        assert torch.equal(g, keep)


# ---------------------------------------------------------------------------------------------
# init: a point on the unit sphere of each norm
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["independent", "shared"])
def draws(request):
    """Orthogonal inits drawn on their own, or inside :func:`shared_draws`."""
    with shared_draws() if request.param == "shared" else contextlib.nullcontext():
        yield request.param


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (6, 6), (1, 9), (9, 1)], ids=_ids)
@pytest.mark.parametrize(
    "options",
    [{}, {"normalized": False}, {"max": True}, {"transpose": True}],
    ids=["default", "unnormalized", "max", "transposed"],
)
def test_spectral_init(shape, options, draws):
    norm = Spectral(**options)
    w = torch.empty(shape)
    sv = torch.linalg.svdvals(norm.init(w).to(F64))
    s = norm.scale_for(shape)
    assert torch.allclose(sv, torch.full_like(sv, s), rtol=1e-5, atol=0)


def test_spectral_init_split(draws):
    """A fused projection's blocks are each on their own sphere."""
    w = Spectral(split=(2, 5)).init(torch.empty(7, 4))
    for block in (w[:2], w[2:]):
        sv = torch.linalg.svdvals(block.to(F64))
        s = math.sqrt(block.shape[0] / block.shape[1])
        assert torch.allclose(sv, torch.full_like(sv, s), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 7, 5)], ids=_ids)
def test_spectral_init_batch_dims(shape, draws):
    w = Spectral(batch_dims=1).init(torch.empty(shape))
    d_out, d_in = shape[-2:]
    sv = torch.linalg.svdvals(w.to(F64))
    assert sv.shape == (shape[0], min(d_out, d_in))
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(d_out / d_in)), rtol=1e-5, atol=0)
    if draws == "independent":  # shared: see test_shared_draws_are_signed_row_permutations
        assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("shape", [(8, 4, 3), (8, 4, 3, 3), (4, 8, 3), (4, 2, 3, 1)], ids=_ids)
def test_spectral_conv_init(shape, draws):
    w = SpectralConv().init(torch.empty(shape))
    d_out, d_in, *kernel = shape
    target = math.sqrt(d_out / d_in) / math.prod(kernel)
    taps = w.to(F64).reshape(d_out, d_in, -1).permute(2, 0, 1)  # (K, d_out, d_in)
    sv = torch.linalg.svdvals(taps)
    assert torch.allclose(sv, torch.full_like(sv, target), rtol=1e-5, atol=0)
    if draws == "independent":  # each tap drawn on its own
        assert not torch.allclose(taps[0], taps[1])


def _magnitudes(q: torch.Tensor) -> torch.Tensor:
    """A matrix's entries' magnitudes, sorted: the same for every signed permutation of it."""
    return q.abs().flatten(-2).sort(-1).values


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (3, 16, 9), (1, 40), (40, 1)], ids=_ids)
def test_shared_draws_are_signed_row_permutations(shape, dtype):
    """Inside ``shared_draws`` every draw of one shape is the same Haar matrix with its rows
    permuted and the signs of its rows and columns flipped: orthonormal, and distinct copies;
    the other orientation is served by the same draw; outside, draws are unrelated."""
    tol = 1e-12 if dtype == F64 else 1e-6
    r, c = shape[-2:]
    with shared_draws():
        a, b = (random_orthogonal(shape, "cpu", dtype) for _ in range(2))
        turned = random_orthogonal((*shape[:-2], c, r), "cpu", dtype)
    fresh = random_orthogonal(shape, "cpu", dtype)
    for q in (a, b, turned, fresh):
        assert q.dtype == dtype and q.shape[-2:] in ((r, c), (c, r))
        gram = q @ q.mT if q.shape[-2] <= q.shape[-1] else q.mT @ q
        eye = torch.eye(gram.shape[-1], dtype=dtype).expand_as(gram)
        torch.testing.assert_close(gram, eye, rtol=0, atol=tol)
    copies = torch.cat([m.reshape(-1, r, c) for m in (a, b, turned.mT)])
    seen = _magnitudes(copies)
    torch.testing.assert_close(seen, seen[:1].expand_as(seen), rtol=0, atol=tol)
    # Rows gathered whole: a's first copy's rows, up to order and sign, are b's.
    rows = a.reshape(-1, r, c)[0].abs().sort(0).values
    torch.testing.assert_close(b.reshape(-1, r, c)[0].abs().sort(0).values, rows, rtol=0, atol=0)
    if r * c > 1 and max(r, c) >= 12:  # a repeat is a (r!·2^(r+c))⁻¹ chance: none here
        for i in range(1, len(copies)):
            assert not torch.equal(copies[0], copies[i])
        assert not torch.allclose(_magnitudes(fresh.reshape(-1, r, c))[0], seen[0])


@pytest.mark.parametrize("shape", [(5, 7), (16, 4)], ids=_ids)
def test_sign_init(shape):
    w = Sign().init(torch.empty(shape))
    assert torch.equal(w.abs(), torch.full(shape, 1 / shape[1]))
    assert bool((w > 0).any()) and bool((w < 0).any())
    w = Sign(normalized=False).init(torch.empty(shape))
    assert torch.equal(w.abs(), torch.ones(shape))
    w = Sign(zero_init=True).init(torch.randn(shape))
    assert torch.equal(w, torch.zeros(shape))


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("transpose", [False, True], ids=["cols", "transpose"])
def test_colnorm_init(normalized, transpose):
    w = ColNorm(normalized=normalized, transpose=transpose).init(torch.empty(6, 10, dtype=F64))
    m = w.mT if transpose else w
    target = 1.0 / m.shape[1] if normalized else 1.0
    rms = m.pow(2).mean(dim=0).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, target), rtol=1e-12, atol=0)


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transpose"])
def test_rownorm_init(normalized, transpose):
    w = RowNorm(normalized=normalized, transpose=transpose).init(torch.empty(6, 10, dtype=F64))
    m = w.mT if transpose else w
    target = 1 / math.sqrt(m.shape[1]) if normalized else 1.0
    norms = m.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, target), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(7,), (1, 5, 3), ()], ids=_ids)
def test_bias_rms_init(shape):
    w = BiasRMS().init(torch.randn(shape))
    assert torch.equal(w, torch.zeros(shape))


def test_auto_init_routes():
    auto = Auto()
    w2 = auto.init(torch.empty(4, 9))
    sv = torch.linalg.svdvals(w2.to(F64))
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(4 / 9)), rtol=1e-5)
    w4 = auto.init(torch.empty(8, 4, 3, 3))
    sv = torch.linalg.svdvals(w4.to(F64).permute(2, 3, 0, 1))
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(2) / 9), rtol=1e-5)
    assert torch.equal(auto.init(torch.randn(5)), torch.zeros(5))


INIT_NORMS = [
    pytest.param(Spectral(), (6, 10), id="spectral"),
    pytest.param(Spectral(batch_dims=1), (2, 6, 10), id="spectral-batch"),
    pytest.param(SpectralConv(), (6, 4, 3, 3), id="conv"),
    pytest.param(Sign(), (6, 10), id="sign"),
    pytest.param(ColNorm(transpose=True), (6, 10), id="colnorm"),
    pytest.param(RowNorm(), (6, 10), id="rownorm"),
    pytest.param(BiasRMS(), (10,), id="biasrms"),
    pytest.param(Auto(), (6, 10), id="auto"),
]


@pytest.mark.parametrize("norm, shape", INIT_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_init_is_in_place(norm, shape, dtype, draws):
    w = torch.full(shape, 123.0, dtype=dtype)
    ptr = w.data_ptr()
    out = norm.init(w)
    assert out is w and w.data_ptr() == ptr and w.dtype == dtype
    assert bool(w.isfinite().all()) and not bool((w == 123.0).any())


def test_init_on_parameter_with_grad():
    p = torch.nn.Parameter(torch.empty(6, 10))
    assert Spectral().init(p) is p
    assert p.requires_grad
    sv = torch.linalg.svdvals(p.detach().to(F64))
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(6 / 10)), rtol=1e-5)


def test_init_bf16_values():
    """In bf16 the init is the float64 one rounded once."""
    w = Sign().init(torch.empty(5, 7, dtype=torch.bfloat16))
    assert torch.equal(w.abs(), torch.full((5, 7), 1 / 7).to(torch.bfloat16))
    w = Spectral().init(torch.empty(5, 7, dtype=torch.bfloat16))
    sv = torch.linalg.svdvals(w.to(F64))
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(5 / 7)), rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# make_norm, fits, messages, validation
# ---------------------------------------------------------------------------------------------


def test_make_norm_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown norm 'Frobenius'") as info:
        make_norm("Frobenius")
    for name in NORMS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, options, bad",
    [
        ("Spectral", {"foo": 1}, "foo"),
        ("Sign", {"eps": 1e-3}, "eps"),
        ("SpectralConv", {"batch_dims": 1}, "batch_dims"),
        ("BiasRMS", {"normalized": True}, "normalized"),
        ("Auto", {"bar": 2}, "bar"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_make_norm_unknown_option(name, options, bad):
    with pytest.raises(ValueError, match=bad):
        make_norm(name, options)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_make_norm_builds_each_norm(name):
    norm = make_norm(name)
    assert type(norm) is NORMS[name] and isinstance(norm, Norm)
    assert norm.name == name


def test_make_norm_passes_options():
    norm = make_norm("ColNorm", {"transpose": True, "normalized": True, "eps": 1e-6})
    assert (norm.transpose, norm.normalized, norm.eps) == (True, True, 1e-6)
    norm = make_norm("Spectral", {"max": True, "coefficients": "polar_express"})
    assert norm.max and norm.coefficients == "polar_express"
    assert "max=True" in repr(norm)


def test_make_norm_instance_passes_through():
    norm = RowNorm(transpose=True)
    assert make_norm(norm) is norm
    assert make_norm(norm, {}) is norm
    with pytest.raises(ValueError, match="norm_kwargs"):
        make_norm(norm, {"transpose": False})


def test_norms_that_fit():
    assert set(norms_that_fit((10,))) == {"BiasRMS", "Auto"}
    assert set(norms_that_fit((5, 7))) == {
        "Spectral",
        "Sign",
        "ColNorm",
        "RowNorm",
        "BiasRMS",
        "Auto",
    }
    conv = norms_that_fit((2, 3, 4))
    assert "SpectralConv" in conv and "Spectral" not in conv
    assert any("batch_dims" in n for n in conv)


def test_describe_misfit_vector():
    msg = describe_misfit(Spectral(), (10,), "bias")
    assert "(10,)" in msg and "2-D" in msg and "BiasRMS" in msg and "bias" in msg


def test_describe_misfit_3d():
    msg = describe_misfit(Spectral(), (2, 3, 4), "experts")
    assert "(2, 3, 4)" in msg and "batch_dims" in msg and "SpectralConv" in msg


def test_describe_misfit_fits():
    assert describe_misfit(Spectral(), (5, 7), "w") is None
    assert describe_misfit(Spectral(batch_dims=1), (2, 5, 7), "w") is None
    assert describe_misfit(BiasRMS(), (2, 5, 7), "w") is None
    msg = describe_misfit(Spectral(batch_dims=1), (5, 7), "w")
    assert msg is not None and "3-D" in msg
    assert describe_misfit(SpectralConv(), (5, 7), "w") is not None


@pytest.mark.parametrize("eps", [0, 0.0, -1, float("nan"), float("inf"), True, "1e-8", None])
@pytest.mark.parametrize("cls", [ColNorm, RowNorm, BiasRMS])
def test_eps_validation(cls, eps):
    with pytest.raises(ValueError, match="eps must be a finite positive number"):
        cls(eps=eps)


@pytest.mark.parametrize("batch_dims", [-1, True, 1.5, None], ids=repr)
@pytest.mark.parametrize("cls", [Spectral, Sign, ColNorm, RowNorm])
def test_batch_dims_validation(cls, batch_dims):
    with pytest.raises(ValueError, match="batch_dims must be a non-negative integer"):
        cls(batch_dims=batch_dims)


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param({"polar": "foo"}, "polar must be", id="polar"),
        pytest.param({"ns_dtype": torch.int32}, "ns_dtype must be", id="ns_dtype-int"),
        pytest.param({"ns_dtype": "bfloat16"}, "ns_dtype must be", id="ns_dtype-str"),
        pytest.param({"coefficients": "fast"}, "coefficient set", id="coefficients"),
        pytest.param({"steps": 0}, "steps", id="steps"),
    ],
)
@pytest.mark.parametrize("cls", [Spectral, SpectralConv])
def test_spectral_option_validation(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(**options)


# --------------------------------------------------------------- the grouped norms' forms

GROUPED = [
    ("Sign", {}, (7, 33)),
    ("Sign", {"transpose": True, "batch_dims": 1}, (3, 5, 9)),
    ("Sign", {"normalized": False}, (4, 4)),
    ("ColNorm", {}, (33, 7)),
    ("ColNorm", {"normalized": True, "transpose": True}, (7, 33)),
    ("ColNorm", {"batch_dims": 1}, (2, 5, 3)),
    ("RowNorm", {}, (7, 33)),
    ("RowNorm", {"normalized": False, "transpose": True}, (33, 7)),
    ("BiasRMS", {}, (129,)),
    ("BiasRMS", {}, (1, 5, 4)),
    ("BiasRMS", {}, ()),
]


def _from_spec(norm, g):
    """``lmo(g)`` computed from :meth:`Norm.group_spec` alone, in float64."""
    spec = norm.group_spec(g.shape)
    m = g.double().reshape(spec.matrices)
    if spec.sign:
        return (torch.sign(m) * spec.q).reshape(g.shape)
    if spec.whole:
        length = m.norm()
    else:
        length = m.norm(dim=-2 if spec.columns else -1, keepdim=True)
    return (m / (length * spec.q + spec.eps)).reshape(g.shape)


@pytest.mark.parametrize("name, options, shape", GROUPED, ids=str)
def test_group_spec_defines_the_lmo(name, options, shape):
    """What the fused kernels run (``group_spec``: the matrices, which way the groups run, ``q``
    and ``ε``) is the reference LMO."""
    norm = make_norm(name, options)
    g = torch.randn(shape)
    torch.testing.assert_close(_from_spec(norm, g), norm.lmo(g).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, options, shape", GROUPED, ids=str)
def test_lmo_from_sums_of_the_whole_tensor_is_the_lmo(name, options, shape):
    norm = make_norm(name, options)
    g = torch.randn(shape)
    got = norm.lmo_from_sums(g, norm.partial_sums(g), g.shape)
    assert got.dtype == torch.float32 and got.shape == g.shape
    torch.testing.assert_close(got, norm.lmo(g), rtol=1e-5, atol=1e-7)


PIECEWISE = [("ColNorm", {}), ("RowNorm", {"transpose": True}), ("BiasRMS", {}),
             ("Sign", {"transpose": True})]  # fmt: skip


@pytest.mark.parametrize("name, options", PIECEWISE, ids=str)
def test_lmo_from_sums_on_row_pieces(name, options):
    """Rows split into pieces, the pieces' sums added: each piece's LMO is its rows of the
    whole tensor's (how a tensor sharded along dim 0 is stepped)."""
    norm = make_norm(name, options)
    g = torch.randn(9, 6, dtype=torch.float64)
    pieces = g.split([4, 0, 5])
    sums = [norm.partial_sums(p) for p in pieces]
    total = None if sums[0] is None else sum(sums)
    got = torch.cat([norm.lmo_from_sums(p, total, g.shape) for p in pieces])
    torch.testing.assert_close(got, norm.lmo(g), rtol=1e-12, atol=1e-14)


def test_spectral_and_auto_have_no_group_spec():
    assert make_norm("Spectral").group_spec((4, 4)) is None
    assert make_norm("Auto").group_spec((4,)) is None  # Auto picks first: see Norm.pick
    with pytest.raises(NotImplementedError, match="not a grouped norm"):
        make_norm("Spectral").partial_sums(torch.zeros(2, 2))
