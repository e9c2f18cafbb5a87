"""Shared fixtures for the test suite."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels are checked in Triton's interpreter; it must be chosen before
# the kernels are defined (they are imported lazily, after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch seed, so random inputs are reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def emulated_module():
    """The native module built against the host emulation (tests/native/emulated.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "native"))
    try:
        import emulated
    finally:
        sys.path.pop(0)
    reason = emulated.unavailable_reason()
    if reason is not None:
        pytest.skip(f"host emulation of the native module cannot be built: {reason}")
    return emulated.build()


@pytest.fixture
def emulated_native(emulated_module, monkeypatch):
    """``scion_kernels._native`` running the emulated module for the duration of a test."""
    from scion_kernels import _native

    monkeypatch.setattr(_native, "_native", emulated_module)
    monkeypatch.setattr(_native, "_native_error", None)
    monkeypatch.setattr(_native, "_native_tried", True)
    return emulated_module


class GraphRecorder:
    """``torch.compile(fn, fullgraph=True)`` that keeps every traced FX graph, so a test can
    count the op calls a compiled step consists of (run through ``aot_eager``)."""

    def __init__(self) -> None:
        self.graphs: list = []

    def compile(self, fn):
        def backend(gm, example_inputs):
            self.graphs.append(gm)
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        return torch.compile(fn, fullgraph=True, backend=backend)

    def assert_same_steps(self, make, grads) -> None:
        """Build ``make() -> (optimizer, params)`` twice and step it over ``grads`` (one list
        per step) eagerly and compiled: the parameters must end bit-identical."""
        results = []
        for compiled in (False, True):
            opt, params = make()
            step = self.compile(opt.step) if compiled else opt.step
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
                step()
            results.append([p.detach().clone() for p in params])
        for eager, compiled in zip(*results, strict=True):
            assert torch.equal(eager, compiled)

    def ops(self, namespace: str = "scion_kernels") -> list[str]:
        """The sorted op names of ``namespace`` in the last traced graph."""
        return sorted(
            str(n.target).removesuffix(".default")
            for n in self.graphs[-1].graph.nodes
            if namespace in str(n.target)
        )


@pytest.fixture
def graph_recorder():
    """A fresh :class:`GraphRecorder`, with dynamo's caches reset."""
    torch._dynamo.reset()
    return GraphRecorder()
