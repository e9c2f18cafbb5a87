"""Native module scion_kernels._C: build/import, argument checking, and kernel parity.

The kernel computes, per element, ``d ← (1 − α)·d + α·g`` in fp32 as ``fmaf(α, g, fl32(1 − α)·d)``
with one final rounding; ``multi_tensor_average_reference_`` (``d.mul_(1 − α).add_(g, alpha=α)``)
is its definition. GPU tests skip cleanly without CUDA; the rest runs on any machine.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from scion_kernels import _native
from scion_kernels._native import (
    multi_tensor_average_,
    multi_tensor_average_reference_,
    native_available,
    native_import_error,
)

SIZES = (1, 7, 129, 4097, 65537, (1 << 20) + 3)
STATE_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nvcc_found() -> bool:
    """Mirrors setup.py's toolchain search (SCION_NVCC, CUDA_HOME, CUDA_PATH, PATH, /usr/local)."""
    override = os.environ.get("SCION_NVCC")
    if override:
        return os.access(override, os.X_OK)
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if any(r and os.access(os.path.join(r, "bin", "nvcc"), os.X_OK) for r in roots):
        return True
    return shutil.which("nvcc") is not None


requires_native = pytest.mark.skipif(
    not native_available(), reason=f"native module not built: {native_import_error()}"
)
requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not native_available(),
    reason="needs a CUDA GPU and the native module",
)


# --- build and import --------------------------------------------------------------------------


@pytest.mark.skipif(
    not _nvcc_found(), reason="no CUDA toolchain, so the native module is not built"
)
@pytest.mark.skipif(
    os.environ.get("SCION_SKIP_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"),
    reason="SCION_SKIP_NATIVE is set, so the native module is not built",
)
def test_native_module_imports_without_gpu_when_toolchain_exists():
    module = importlib.import_module("scion_kernels._C")
    assert native_available()
    assert native_import_error() is None
    assert (module.DTYPE_FLOAT32, module.DTYPE_BFLOAT16, module.DTYPE_FLOAT16) == (0, 1, 2)
    assert module.CUDA_RUNTIME_VERSION >= 11080


def test_availability_queries_never_raise():
    available = native_available()
    assert isinstance(available, bool)
    assert (native_import_error() is None) == available


def test_package_import_does_not_load_native_module():
    code = "import sys, scion_kernels; assert 'scion_kernels._C' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_native_module_error_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "_native", None)
    monkeypatch.setattr(_native, "_native_tried", True)
    monkeypatch.setattr(_native, "_native_error", "ImportError: no module named _C")
    assert not native_available()
    with pytest.raises(RuntimeError, match="not available") as info:
        _native._require_native()
    message = str(info.value)
    for needle in ("CUDA toolchain", "pip install -e . --no-build-isolation", "SCION_SKIP_NATIVE"):
        assert needle in message


# --- host-side behaviour of the binding (no GPU needed) -----------------------------------------


@requires_native
@pytest.mark.parametrize(
    ("numels", "launches"),
    [
        (lambda m: [], 0),
        (lambda m: [0, 0], 0),
        (lambda m: [1], 1),
        (lambda m: [(1 << 20) + 3] * 100, 1),
        (lambda m: [1] * m, 1),
        (lambda m: [1] * (m + 1), 2),
        (lambda m: [0] * 10 + [1] * m + [0] * 10, 1),
        (lambda m: [SIZES[i % len(SIZES)] for i in range(m + 56)], 2),
        (lambda m: [7] * (2 * m + 1), 3),
    ],
)
def test_launch_packing(numels, launches):
    from scion_kernels import _C

    per_launch = _C.MULTI_TENSOR_AVERAGE_MAX_TENSORS_PER_LAUNCH
    # 200 tensors must not fit into one launch, so the GPU parity tests cross a launch boundary.
    assert 16 <= per_launch < 200
    assert _C.multi_tensor_average_num_launches(numels(per_launch)) == launches


@requires_native
def test_launch_packing_rejects_negative_sizes():
    from scion_kernels import _C

    with pytest.raises(ValueError, match="negative element count"):
        _C.multi_tensor_average_num_launches([4, -1])


@requires_native
def test_binding_checks_arguments_before_touching_cuda():
    from scion_kernels import _C

    f32 = _C.DTYPE_FLOAT32
    with pytest.raises(ValueError, match="equal lengths"):
        _C.multi_tensor_average([1, 2], [3], [4, 5], f32, f32, 0.5, 0, 0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        _C.multi_tensor_average([1], [2], [3], f32, f32, 1.5, 0, 0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        _C.multi_tensor_average([1], [2], [3], _C.DTYPE_FLOAT16, f32, 0.5, 0, 0)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.multi_tensor_average([0], [2], [3], f32, f32, 0.5, 0, 0)
    # Nothing to do: returns without initialising CUDA.
    _C.multi_tensor_average([0, 0], [0, 0], [0, 0], f32, f32, 0.5, 0, 0)


@requires_native
def test_binding_turns_cuda_failures_into_runtime_errors():
    from scion_kernels import _C

    # Fails in cudaGetDevice without a usable driver and in cudaSetDevice with one, so the bogus
    # addresses are never dereferenced.
    f32 = _C.DTYPE_FLOAT32
    with pytest.raises(RuntimeError, match=r"multi_tensor_average: cuda\w+ failed: .*1 tensors"):
        _C.multi_tensor_average([16], [32], [3], f32, f32, 0.5, 1_000_000, 0)


# --- argument checking of multi_tensor_average_ (no GPU needed) ---------------------------------


def test_cpu_tensors_are_rejected_with_a_pointer_to_the_reference():
    states, grads = [torch.randn(4)], [torch.randn(4)]
    with pytest.raises(ValueError, match="runs on CUDA tensors only; got a tensor on cpu") as info:
        multi_tensor_average_(states, grads, 0.1)
    assert "multi_tensor_average_reference_" in str(info.value)


def test_empty_lists_are_a_no_op():
    multi_tensor_average_([], [], 0.5)
    multi_tensor_average_reference_([], [], 0.5)


@pytest.mark.parametrize("fn", [multi_tensor_average_, multi_tensor_average_reference_])
def test_mismatched_lengths(fn):
    with pytest.raises(ValueError, match="same length"):
        fn([torch.randn(3)], [torch.randn(3), torch.randn(3)], 0.5)


@pytest.mark.parametrize("fn", [multi_tensor_average_, multi_tensor_average_reference_])
def test_mismatched_shapes(fn):
    with pytest.raises(ValueError, match="shape"):
        fn([torch.randn(3, 2)], [torch.randn(6)], 0.5)


@pytest.mark.parametrize("fn", [multi_tensor_average_, multi_tensor_average_reference_])
@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf])
def test_alpha_out_of_range(fn, alpha):
    with pytest.raises(ValueError, match="alpha"):
        fn([torch.randn(3)], [torch.randn(3)], alpha)


def test_non_tensor_elements():
    with pytest.raises(TypeError, match="must be tensors"):
        multi_tensor_average_([torch.randn(3)], [[1.0, 2.0, 3.0]], 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32])
def test_unsupported_state_dtype(dtype):
    with pytest.raises(TypeError, match="supported state dtypes are float32 and bfloat16"):
        multi_tensor_average_([torch.zeros(3, dtype=dtype)], [torch.randn(3)], 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_unsupported_grad_dtype(dtype):
    with pytest.raises(TypeError, match="supported gradient dtypes"):
        multi_tensor_average_([torch.randn(3)], [torch.zeros(3, dtype=dtype)], 0.5)


def test_non_contiguous_tensors():
    state = torch.randn(4, 6).t()
    with pytest.raises(ValueError, match=r"states\[0\] is not contiguous"):
        multi_tensor_average_([state], [torch.randn(6, 4)], 0.5)


# --- the reference, against the formula in float64 ---------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_reference_matches_formula_in_float64(alpha):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (3, 5), (2, 3, 4), (0,), (129,)]
    d0 = [torch.randn(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) - 0.5 for s in shapes]
    states = [d.clone() for d in d0]
    multi_tensor_average_reference_(states, grads, alpha)
    for state, d, g in zip(states, d0, grads, strict=True):
        expected = (1 - alpha) * d + alpha * g
        torch.testing.assert_close(state, expected, rtol=1e-15, atol=1e-15)


def test_reference_mixed_dtypes_keeps_dtypes_and_grads():
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
    multi_tensor_average_reference_(states, grads, 0.3)
    for state, d, g, g_before in zip(states, d0, grads, g0, strict=True):
        assert torch.equal(g, g_before)
        expected = 0.7 * d + 0.3 * g.double()
        tol = 2**-6 if state.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(state.double(), expected, rtol=tol, atol=tol)
    assert [s.dtype for s in states] == [torch.float32, torch.bfloat16, torch.float32]


# --- GPU parity ----------------------------------------------------------------------------------


def _make_inputs(state_dtype, grad_dtype, count, seed, device="cuda"):
    """Random (never all-zero) states and grads; every third pair is a misaligned view."""
    gen = torch.Generator(device=device).manual_seed(seed)
    states, grads = [], []
    for i in range(count):
        n = SIZES[i % len(SIZES)]
        offset = 1 if i % 3 == 1 else 0
        s = torch.randn(n + offset, generator=gen, device=device) * 2 + 0.25
        g = torch.randn(n + offset, generator=gen, device=device) - 0.5
        states.append(s.to(state_dtype)[offset:])
        grads.append(g.to(grad_dtype)[offset:])
    return states, grads


def _check_against_exact_and_reference(kernel, reference, d0, grads, alpha):
    for k, r, d, g in zip(kernel, reference, d0, grads, strict=True):
        d64, g64 = d.double(), g.double()
        exact = (1 - alpha) * d64 + alpha * g64
        scale = (1 - alpha) * d64.abs() + alpha * g64.abs()
        err_exact = (k.double() - exact).abs()
        err_ref = (k.double() - r.double()).abs()
        if k.dtype == torch.float32:
            # Four fp32 roundings (1 - alpha, alpha, the product, the fma), each <= 2^-24 * scale.
            assert bool((err_exact <= 2**-22 * scale).all()), float(err_exact.max())
            assert bool((err_ref <= 2**-21 * scale).all()), float(err_ref.max())
        else:
            # bf16 unit roundoff u = 2^-8. Kernel: one rounding of an fp32 value, so
            # |k - exact| <= u|exact| plus fp32 noise. Reference: rounds g, the product and the
            # sum, and on some backends (CPU) also the scalars 1 - alpha and alpha and the
            # product alpha * g, so |r - exact| <= u(2(1 - alpha)|d| + 3 alpha|g| + |exact|) plus
            # second-order terms: one or two bf16 ulps at the operands' scale.
            assert bool((err_exact <= 2**-8 * exact.abs() + 2**-20 * scale).all())
            assert bool((err_ref <= 2**-8 * (3 * scale + 2 * exact.abs()) + 2**-15 * scale).all())


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.1, 0.37])
def test_parity_many_tensors(state_dtype, grad_dtype, alpha):
    states, grads = _make_inputs(state_dtype, grad_dtype, count=200, seed=7)
    d0 = [s.clone() for s in states]
    reference = [s.clone() for s in states]
    g0 = [g.clone() for g in grads]
    multi_tensor_average_reference_(reference, grads, alpha)
    multi_tensor_average_(states, grads, alpha)
    torch.cuda.synchronize()
    assert all(torch.equal(g, g_before) for g, g_before in zip(grads, g0, strict=True))
    _check_against_exact_and_reference(states, reference, d0, grads, alpha)


@pytest.mark.gpu
@requires_gpu
def test_mixed_dtype_list_in_one_call():
    pairs = [(s, g) for s in STATE_DTYPES for g in GRAD_DTYPES]
    states, grads = [], []
    for i, (state_dtype, grad_dtype) in enumerate(pairs):
        s, g = _make_inputs(state_dtype, grad_dtype, count=12, seed=100 + i)
        states += s
        grads += g
    d0 = [s.clone() for s in states]
    reference = [s.clone() for s in states]
    multi_tensor_average_reference_(reference, grads, 0.2)
    multi_tensor_average_(states, grads, 0.2)
    torch.cuda.synchronize()
    _check_against_exact_and_reference(states, reference, d0, grads, 0.2)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
def test_alpha_endpoints_are_exact(state_dtype):
    for grad_dtype in GRAD_DTYPES:
        states, grads = _make_inputs(state_dtype, grad_dtype, count=12, seed=3)
        d0 = [s.clone() for s in states]
        multi_tensor_average_(states, grads, 0.0)
        assert all(torch.equal(s, d) for s, d in zip(states, d0, strict=True))
        multi_tensor_average_(states, grads, 1.0)
        assert all(torch.equal(s, g.to(state_dtype)) for s, g in zip(states, grads, strict=True))


@pytest.mark.gpu
@requires_gpu
def test_runs_on_the_current_non_default_stream():
    states, grads = _make_inputs(torch.float32, torch.bfloat16, count=6, seed=11)
    start = [s.clone() for s in states]
    expected = [s.clone() for s in start]
    multi_tensor_average_reference_(expected, grads, 0.25)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # The copy back to `start` waits behind a long sleep on `side`. Had the kernel gone to
        # any other stream, it would run first and the late copy would erase its result.
        torch.cuda._sleep(200_000_000)
        for s, s0 in zip(states, start, strict=True):
            s.copy_(s0)
        multi_tensor_average_(states, grads, 0.25)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for s, e, d, g in zip(states, expected, start, grads, strict=True):
        scale = 0.75 * d.double().abs() + 0.25 * g.double().abs()
        assert bool(((s.double() - e.double()).abs() <= 2**-21 * scale).all())


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not native_available(),
    reason="needs two CUDA GPUs and the native module",
)
def test_tensors_on_a_non_current_device():
    with torch.cuda.device(0):
        states, grads = _make_inputs(torch.float32, torch.float32, count=6, seed=5, device="cuda:1")
        expected = [s.clone() for s in states]
        multi_tensor_average_reference_(expected, grads, 0.5)
        multi_tensor_average_(states, grads, 0.5)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    for s, e in zip(states, expected, strict=True):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensors_on_different_devices_are_rejected():
    with pytest.raises(ValueError, match="CUDA tensors only"):
        multi_tensor_average_([torch.randn(3, device="cuda")], [torch.randn(3)], 0.5)
