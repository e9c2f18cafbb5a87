"""Triton is optional: without it, every backend but ``"triton"`` steps, and that one says why.

These tests run where Triton cannot be imported: ``.ci/run``'s second pass puts
``tests/without_triton`` on ``PYTHONPATH``, which hides it (the rest of the suite runs there
too, its Triton tests skipping). Where Triton is importable they are skipped.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from scion_kernels import Scion, ScionLight, param_groups

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None,
    reason="checks the package without Triton; .ci/run runs it with tests/without_triton on "
    "PYTHONPATH",
)


def _triton_modules() -> list[str]:
    """Modules of Triton, or of ours that need it, imported so far (the hiding entry aside)."""
    kernels = ("newton_schulz", "grouped", "tuning")
    ours = tuple(f"scion_kernels.backends.triton.{m}" for m in kernels)
    return sorted(
        name
        for name, module in sys.modules.items()
        if module is not None and (name.split(".")[0] == "triton" or name in ours)
    )


def test_triton_is_absent():
    with pytest.raises(ImportError):
        import triton  # noqa: F401


def test_triton_backend_says_why_at_construction():
    with pytest.raises(ValueError, match="backend 'triton' .*Triton is not installed"):
        Scion([nn.Parameter(torch.randn(4, 4))], backend="triton")


@pytest.mark.parametrize("cls", [Scion, ScionLight])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_reference_backends_step(cls, backend):
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    opt = cls(param_groups(model, "mlp"), lr=0.05, momentum=0.5, backend=backend)
    opt.init()
    for _ in range(2):
        nn.functional.cross_entropy(
            model(torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1])
        ).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _triton_modules() == []


@pytest.mark.parametrize("cls", [Scion, ScionLight])
def test_native_backend_steps_without_triton(emulated_native, cls):
    """``backend="cuda"`` (the native kernels, here in the host emulation) imports no Triton:
    its step plans buckets and grouped launches in Triton-free code."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    kwargs = dict(lr=0.05, momentum=0.5, norm_kwargs={"ns_dtype": torch.bfloat16})
    opts = [cls(m.parameters(), backend=b, **kwargs) for m, b in ((model, "torch"), (twin, "cuda"))]
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    for m, opt in zip((model, twin), opts, strict=True):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0.02 * 0.05 + 1e-6)
    assert _triton_modules() == []
