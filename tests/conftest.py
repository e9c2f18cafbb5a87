"""Shared fixtures for the test suite."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor, nn

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
def emulated_native(emulated_module):
    """The ``"cuda"`` backend running the emulated module (on CPU tensors) for the duration of
    a test; yields the module."""
    from scion_kernels import backends

    with backends.using(backends.NativeBackend(module=emulated_module)):
        yield emulated_module


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

    def over_a_schedule(self, model, opt, x, lr_lambda, steps: int) -> int:
        """Train ``model`` on ``x`` for ``steps`` steps with ``opt.step()`` compiled as torch
        documents it for its optimizers (a compiled function calling it, not ``fullgraph``:
        every graph a break or a recompile makes is kept) and its tensor ``lr`` moved by
        ``LambdaLR(lr_lambda)``; returns how many graphs there were after three steps."""

        def backend(gm, example_inputs):
            self.graphs.append(gm)
            return gm.forward

        step = torch.compile(lambda: opt.step(), backend=backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        warm = 0
        for k in range(steps):
            model(x).square().mean().backward()
            step()
            sched.step()
            opt.zero_grad()
            if k == 2:
                warm = len(self.graphs)
        return warm

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


class Tolerance:
    """The rules the kernels' bf16/fp16 Newton–Schulz results are held to (tests/test_backends.py
    says which test uses which)."""

    @staticmethod
    def rel(x: Tensor, exact: Tensor) -> float:
        """Relative Frobenius distance, in float64."""
        return ((x.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()

    @classmethod
    def assert_rule(cls, kernel: Tensor, reference: Tensor, exact: Tensor) -> None:
        """Against float64 Newton–Schulz (``exact``): the kernel's relative error at most twice
        the reference's in the same dtype on the same input, plus 1e-3 for results that are
        exact in both."""
        e_kernel, e_reference = cls.rel(kernel, exact), cls.rel(reference, exact)
        assert e_kernel <= 2.0 * e_reference + 1e-3, (e_kernel, e_reference)

    @staticmethod
    def check_polar(
        got: Tensor,
        G: Tensor,
        coefficients: str,
        dtype: torch.dtype,
        steps: int | None = None,
        gram: bool = False,
    ) -> None:
        """Against the float64 SVD polar factor, per matrix of ``G``: the kernel's Frobenius
        error at most twice the reference's (same compute dtype, same ``gram``) plus
        1e-3·√min(m, n)."""
        from scion_kernels.newton_schulz import newton_schulz, polar_svd

        ref = newton_schulz(G.cpu(), coefficients, steps, dtype=dtype, gram=gram).double()
        exact = polar_svd(G.cpu())
        got = got.cpu().double()
        err = (got - exact).flatten(1).norm(dim=1)
        ref_err = (ref - exact).flatten(1).norm(dim=1)
        bound = 2 * ref_err + 1e-3 * math.sqrt(min(G.shape[-2:]))
        assert bool((err <= bound).all()), (err, ref_err)


@pytest.fixture
def tolerance():
    """:class:`Tolerance`."""
    return Tolerance


class MixedParams:
    """Wide, tall (sharing a bucket), square, conv, bias and stacked-expert parameters in two
    param groups, and reproducible gradients for them: the fused backends' common test set."""

    #: The kernels compute Newton–Schulz in bf16 (``ns_dtype=None`` means bf16 on a GPU); the
    #: reference they are held to computes in bf16 too, on any CPU.
    BF16 = {"ns_dtype": torch.bfloat16}

    @classmethod
    def groups(cls, device: torch.device, dtype: torch.dtype = torch.float32) -> list[dict]:
        gen = torch.Generator().manual_seed(1)

        def param(*shape):
            return nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype))

        return [
            {"params": [param(20, 36), param(36, 20), param(24, 24), param(8, 4, 3), param(36)]},
            {
                "params": [param(3, 12, 20)],
                "norm": "Spectral",
                "norm_kwargs": {"batch_dims": 1, **cls.BF16},
            },
        ]

    @staticmethod
    def params(groups: list[dict]) -> list[nn.Parameter]:
        return [p for g in groups for p in g["params"]]

    @classmethod
    def gradients(cls, groups: list[dict], steps: int) -> list[list[Tensor]]:
        """``steps`` lists of float32 gradients, one per parameter of ``groups``."""
        gen = torch.Generator().manual_seed(2)
        params = cls.params(groups)
        return [
            [torch.randn(p.shape, generator=gen).to(p.device) for p in params] for _ in range(steps)
        ]

    @classmethod
    def with_gradients(cls, device: torch.device) -> tuple[list[dict], list[nn.Parameter]]:
        """The groups and their parameters, every ``.grad`` set to the first gradients."""
        groups = cls.groups(device)
        params = cls.params(groups)
        for p, g in zip(params, cls.gradients(groups, 1)[0], strict=True):
            p.grad = g
        return groups, params


@pytest.fixture
def mixed_params():
    """:class:`MixedParams`."""
    return MixedParams
