"""The multi-tensor average kernel's device code, run on the host against the reference.

No GPU is needed: ``tests/native/emulate_average.cu`` includes the kernel source, packs the
launches exactly as the CUDA entry point does and executes every block and thread of every
launch on the CPU. This checks the packing across several launches, the chunk indexing, the
vectorized and the scalar (misaligned) paths and the arithmetic against
``multi_tensor_average_reference_``. Skipped where nvcc is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from scion_kernels._native import multi_tensor_average_reference_

HERE = Path(__file__).parent
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_TENSORS_PER_LAUNCH = 144  # kMaxTensors in csrc/multi_tensor_average.cu
CHUNK = 1 << 16  # kChunkSize


def _nvcc() -> str | None:
    for candidate in (
        os.environ.get("SCION_NVCC"),
        os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the host emulation needs a CUDA toolchain to compile")
    exe = tmp_path_factory.mktemp("emu") / "emulate_average"
    subprocess.run(
        [nvcc, "-std=c++17", "-O2", "-o", str(exe), str(HERE / "native" / "emulate_average.cu")],
        check=True,
        capture_output=True,
    )
    return exe


def _layout(numels: list[int]) -> tuple[list[int], list[int]]:
    """Element offsets into the flat buffers; every third state, fifth grad is misaligned."""
    state_off, grad_off, s, g = [], [], 0, 0
    for i, n in enumerate(numels):
        s += 1 if i % 3 == 1 else 0
        g += 1 if i % 5 == 2 else 0
        state_off.append(s)
        grad_off.append(g)
        s += n + 8
        g += n + 8
    return state_off, grad_off


NUMELS = [1, 7, 129, 4097, 0, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, (1 << 20) + 3] + [
    (37 * i) % 700 + 1 for i in range(150)
]


@pytest.mark.parametrize("alpha", [0.1, 0.37, 1.0, 0.0])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emulated_kernel_matches_reference(emulator, tmp_path, state_dtype, grad_dtype, alpha):
    numels = NUMELS
    state_off, grad_off = _layout(numels)
    total_s, total_g = state_off[-1] + numels[-1] + 8, grad_off[-1] + numels[-1] + 8
    state = torch.randn(total_s).to(state_dtype)
    grad = torch.randn(total_g).to(grad_dtype)
    (tmp_path / "state.bin").write_bytes(state.view(torch.uint8).numpy().tobytes())
    (tmp_path / "grad.bin").write_bytes(grad.view(torch.uint8).numpy().tobytes())
    lines = [f"{CODES[state_dtype]} {CODES[grad_dtype]} {alpha!r} {len(numels)}"]
    lines += [f"{n} {s} {g}" for n, s, g in zip(numels, state_off, grad_off, strict=True)]
    (tmp_path / "manifest.txt").write_text("\n".join(lines) + "\n")

    run = subprocess.run([str(emulator), str(tmp_path)], check=True, capture_output=True, text=True)
    nonempty = sum(1 for n in numels if n)
    assert int(run.stdout) == -(-nonempty // MAX_TENSORS_PER_LAUNCH)  # several launches

    raw = bytearray((tmp_path / "out.bin").read_bytes())
    out = torch.frombuffer(raw, dtype=torch.uint8).view(state_dtype)
    views = lambda buf, offs: [buf[o : o + n] for o, n in zip(offs, numels, strict=True)]  # noqa: E731
    d0 = [v.clone() for v in views(state, state_off)]
    g = views(grad, grad_off)
    exact = [(1 - alpha) * d.double() + alpha * gg.double() for d, gg in zip(d0, g, strict=True)]
    ref = [v.clone() for v in d0]
    multi_tensor_average_reference_(ref, g, alpha)

    written = torch.zeros(total_s, dtype=torch.bool)
    for o, n in zip(state_off, numels, strict=True):
        written[o : o + n] = True
    # Nothing outside the tensors is touched (the padding between them keeps its values).
    assert torch.equal(out[~written].float(), state[~written].float())
    for got, r, e, d, gg in zip(views(out, state_off), ref, exact, d0, g, strict=True):
        if state_dtype == torch.float32:
            # fma(α, g, fl(β·d)) against fl(fl(β·d) + α·g): at most one rounding apart.
            torch.testing.assert_close(got, r, rtol=2**-23, atol=2**-24)
        else:
            # One rounding of the fp32 result to bf16: within half a bf16 ulp (≤ 2⁻⁸ relative)
            # of the fp32 result, which is within a few fp32 roundings of the scaled terms.
            err = (got.double() - e).abs()
            fp32 = 2**-22 * ((1 - alpha) * d.double().abs() + alpha * gg.double().abs())
            assert bool((err <= 2**-8 * (e.abs() + fp32) + fp32).all())
