"""Native module scion_kernels._C: build, lazy import, and the error that says how to build it.

The native kernels' parity with the reference is tested in tests/test_backends.py, their own
tiles, workspace and errors in tests/test_native_ns.py (on a GPU, or through the host emulation
of the CUDA features they use)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest

from scion_kernels.backends.cuda.native import (
    native_available,
    native_import_error,
    require_native,
)


def _nvcc_found() -> bool:
    """Mirrors setup.py's toolchain search (SCION_NVCC, CUDA_HOME, CUDA_PATH, PATH, /usr/local)."""
    override = os.environ.get("SCION_NVCC")
    if override:
        return os.access(override, os.X_OK)
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if any(r and os.access(os.path.join(r, "bin", "nvcc"), os.X_OK) for r in roots):
        return True
    return shutil.which("nvcc") is not None


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


def test_missing_native_module_error_explains_how_to_build():
    with pytest.raises(RuntimeError, match="not available") as info:
        require_native(None)
    message = str(info.value)
    for needle in ("CUDA toolchain", "pip install -e . --no-build-isolation", "SCION_SKIP_NATIVE"):
        assert needle in message


# --- what the compiler makes of the kernels for Hopper -----------------------------------------


@pytest.mark.wgmma
@pytest.mark.skipif(not _nvcc_found(), reason="no CUDA toolchain to compile for sm_90a")
def test_wgmma_kernels_compile_for_sm90a_unserialized():
    """Every native kernel compiles for sm_90a without spills, and ptxas keeps the wgmma
    products asynchronous: no C75xx "wgmma.mma_async instructions are serialized" warning
    (which a register written inside a product group's span brings; see csrc/ns_wgmma.cuh)."""
    from bench.compile_report import native_report

    rows = [line.split(" | ") for line in native_report().splitlines() if line.startswith("| `")]
    wgmma = [r for r in rows if "wgmma_kernel<" in r[0]]
    # 2 dtypes × (2 × (X·Xᵀ, polynomial): 128×128 and 128×256 tiles, and 3 × (apply, apply with
    # the update): Xᵀ from registers, X from shared memory, and that on 128×256 tiles)
    assert len(wgmma) == 20
    for name, _, spills, _, warnings in rows:
        assert spills == "0", name
        assert warnings.rstrip(" |") == "none", (name, warnings)
