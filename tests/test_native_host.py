"""The multi-tensor average kernel's device code, run on the host against the reference.

No GPU is needed: the ``emulated_native`` fixture builds the native module from the same sources
against the host emulation (tests/native/emulation.h), which runs every block and thread of
every launch on the CPU. This checks the packing across several launches, the chunk indexing,
the vectorized and the scalar (misaligned) paths and the arithmetic against
``multi_tensor_average_reference_``.
"""

from __future__ import annotations

import pytest
import torch

from scion_kernels._native import multi_tensor_average_, multi_tensor_average_reference_

MAX_TENSORS_PER_LAUNCH = 144  # kMaxTensors in csrc/multi_tensor_average.cu
CHUNK = 1 << 16  # kChunkSize

NUMELS = [1, 7, 129, 4097, 0, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, (1 << 20) + 3] + [
    (37 * i) % 700 + 1 for i in range(150)
]


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


def test_emulated_packing(emulated_native):
    assert emulated_native.MULTI_TENSOR_AVERAGE_MAX_TENSORS_PER_LAUNCH == MAX_TENSORS_PER_LAUNCH
    assert emulated_native.MULTI_TENSOR_AVERAGE_CHUNK_SIZE == CHUNK
    nonempty = sum(1 for n in NUMELS if n)
    launches = emulated_native.multi_tensor_average_num_launches(NUMELS)
    assert launches == -(-nonempty // MAX_TENSORS_PER_LAUNCH) == 2  # several launches


@pytest.mark.parametrize("alpha", [0.1, 0.37, 1.0, 0.0])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emulated_kernel_matches_reference(emulated_native, state_dtype, grad_dtype, alpha):
    numels = NUMELS
    state_off, grad_off = _layout(numels)
    total_s, total_g = state_off[-1] + numels[-1] + 8, grad_off[-1] + numels[-1] + 8
    state = torch.randn(total_s).to(state_dtype)
    grad = torch.randn(total_g).to(grad_dtype)
    views = lambda buf, offs: [buf[o : o + n] for o, n in zip(offs, numels, strict=True)]  # noqa: E731
    out = state.clone()
    multi_tensor_average_(views(out, state_off), views(grad, grad_off), alpha)

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
