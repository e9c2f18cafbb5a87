"""The momentum average ``d ← (1 − α)·d + α·g`` (``scion_kernels.elementwise``): its checks, and
its values against the formula in float64."""

from __future__ import annotations

import math

import pytest
import torch

from scion_kernels.elementwise import momentum_average_


def test_empty_lists_are_a_no_op():
    momentum_average_([], [], 0.5)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        momentum_average_([torch.randn(3)], [torch.randn(3), torch.randn(3)], 0.5)


def test_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        momentum_average_([torch.randn(3, 2)], [torch.randn(6)], 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        momentum_average_([torch.randn(3)], [torch.randn(3)], alpha)


def test_non_tensor_elements():
    with pytest.raises(TypeError, match="must be tensors"):
        momentum_average_([torch.randn(3)], [[1.0, 2.0, 3.0]], 0.5)


def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="is on meta"):
        momentum_average_([torch.randn(3)], [torch.empty(3, device="meta")], 0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_matches_formula_in_float64(alpha):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (3, 5), (2, 3, 4), (0,), (129,)]
    d0 = [torch.randn(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) - 0.5 for s in shapes]
    states = [d.clone() for d in d0]
    momentum_average_(states, grads, alpha)
    for state, d, g in zip(states, d0, grads, strict=True):
        expected = (1 - alpha) * d + alpha * g
        torch.testing.assert_close(state, expected, rtol=1e-15, atol=1e-15)


def test_mixed_dtypes_keep_their_dtypes_and_grads():
    gen = torch.Generator().manual_seed(1)
    states = [
        torch.randn(33, generator=gen),
        torch.randn(17, generator=gen).bfloat16(),
        torch.randn(5, generator=gen),
    ]
    grads = [
        torch.randn(33, generator=gen).bfloat16(),
        torch.randn(17, generator=gen),
        torch.randn(5, generator=gen).half(),
    ]
    d0 = [s.double() for s in states]
    g0 = [g.clone() for g in grads]
    momentum_average_(states, grads, 0.3)
    for state, d, g, g_before in zip(states, d0, grads, g0, strict=True):
        assert torch.equal(g, g_before)
        expected = 0.7 * d + 0.3 * g.double()
        tol = 2**-6 if state.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(state.double(), expected, rtol=tol, atol=tol)
    assert [s.dtype for s in states] == [torch.float32, torch.bfloat16, torch.float32]
