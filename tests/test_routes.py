"""Routing: which backend object steps each parameter, decided when a group's route is built.

A route asks the group's backend (:meth:`~scion_kernels.backends.Backend.refusal`, from its
declared :class:`~scion_kernels.backends.Capabilities`) about each parameter; what it does not
take falls back to the reference at construction, visibly (``print(optimizer)``,
``format_groups``), and steps exactly as the reference does. Backends are swapped for a test
with :func:`scion_kernels.backends.using`, never by patching their internals.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import subprocess
import sys
import textwrap

import pytest
import torch
from recording import Recording
from torch import nn

from scion_kernels import Scion, backends, format_groups
from scion_kernels.backends import Backend, Capabilities, NativeBackend
from scion_kernels.backends.base import below_floor, for_arch
from scion_kernels.backends.triton import POLICIES, Policy, TritonBackend

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(params=["triton", "cuda-emulated"])
def fused(request) -> Backend:
    """Each fused backend, registered for the test, on the CPU (Triton's interpreter, the
    native module's host emulation); skips where it cannot run here."""
    if request.param == "triton":
        backend: Backend = TritonBackend()
        why = backend.unavailable_reason(torch.device("cpu"))
        if why is not None:
            pytest.skip(f"Triton kernels: {why}")
    else:
        backend = NativeBackend(module=request.getfixturevalue("emulated_module"))
    with backends.using(backend):
        yield backend


def _limits(backend: Backend) -> list[tuple[str, dict, tuple[int, ...], torch.dtype, bool]]:
    """Cases read from ``backend``'s declared capabilities: (norm, options, shape, parameter
    dtype, taken)."""
    caps = backend.capabilities
    cases = []
    for dtype in DTYPES:  # parameter dtypes
        cases.append(("Spectral", {"ns_dtype": torch.bfloat16}, (6, 4), dtype,
                      dtype in caps.tensor_dtypes))  # fmt: skip
        cases.append(("RowNorm", {}, (6, 4), dtype, dtype in caps.tensor_dtypes))
    for dtype in DTYPES:  # Newton–Schulz compute dtypes
        cases.append(("Spectral", {"ns_dtype": dtype}, (6, 4), torch.float32,
                      dtype in caps.compute_dtypes))  # fmt: skip
    if caps.max_steps is not None:
        for steps in (caps.max_steps, caps.max_steps + 1):
            cases.append(("Spectral", {"steps": steps}, (6, 4), torch.float32,
                          steps <= caps.max_steps))  # fmt: skip
    for polar in ("svd", "gram"):
        cases.append(("Spectral", {"polar": polar}, (12, 4), torch.float32, polar in caps.polars))
    cases.append(("Spectral", {"split": (2, 4)}, (6, 4), torch.float32, False))
    for norm in ("Sign", "ColNorm", "BiasRMS"):
        shape = (6,) if norm == "BiasRMS" else (6, 4)
        cases.append((norm, {}, shape, torch.float32, norm in caps.norms))
    return cases


def test_declared_limits_fall_back_at_construction(fused):
    """Every limit a fused backend declares: a parameter outside it is routed to the reference
    when the optimizer is built, with the reason shown, and steps exactly as the reference; a
    parameter inside it is routed to the backend."""
    for norm, options, shape, dtype, taken in _limits(fused):
        what = f"{fused.name}: {norm}{options} {shape} {dtype}"
        p = nn.Parameter(torch.randn(shape, dtype=dtype))
        opt = Scion([p], lr=0.1, norm=norm, norm_kwargs=options, backend=fused.name)
        route = opt._route(0, opt.param_groups[0])
        assert (route.backends[0] is fused) == taken, what
        assert (route.fallbacks[0] is None) == taken, what
        if taken:
            continue
        assert route.backends[0].name == "torch", what
        assert route.fallbacks[0].startswith(f"{fused.name} does not take"), what
        if "split" in options:
            assert route.fallbacks[0].endswith("not a reshape of the parameter (split blocks)")
        assert f"stepped by: torch ({fused.name} does not take" in repr(opt), what
        ref = nn.Parameter(p.detach().clone())
        twin = Scion([ref], lr=0.1, norm=norm, norm_kwargs=options, backend="torch")
        for _ in range(2):
            g = torch.randn(shape, dtype=dtype)
            p.grad, ref.grad = g.clone(), g.clone()
            opt.step()
            twin.step()
        assert torch.equal(p, ref), what


def test_capturable_steps_on_the_kernels(fused, monkeypatch):
    """A capturable optimizer's parameters step on the fused kernels, which read tensors
    ``lr`` and ``momentum`` on the device: no ``Tensor.item()`` in any step (the first
    included), and the steps are those of numbers to the rounding of ``γ·ρ`` in float32."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 4))
    b = nn.Parameter(torch.randn(6))
    ref = [nn.Parameter(t.detach().clone()) for t in (p, b)]
    lr = torch.tensor(0.1)
    opt = Scion([p, b], lr=lr, backend=fused.name, momentum=torch.tensor(0.5),
                nonfinite="ignore", capturable=True,
                norm_kwargs={"ns_dtype": torch.bfloat16})  # fmt: skip
    route = opt._route(0, opt.param_groups[0])
    assert route.backends == (fused, fused) and route.fallbacks == (None, None)
    twin = Scion(ref, lr=0.1, backend=fused.name, momentum=0.5, nonfinite="ignore",
                 norm_kwargs={"ns_dtype": torch.bfloat16})  # fmt: skip
    for k in range(3):
        lr.fill_(0.1 / (k + 1))
        twin.param_groups[0]["lr"] = 0.1 / (k + 1)
        for t, r in zip((p, b), ref, strict=True):
            t.grad = torch.randn(t.shape)
            r.grad = t.grad.clone()
        with monkeypatch.context() as patched:
            patched.setattr(torch.Tensor, "item", _no_host_reads)
            opt.step()
        twin.step()
        for t, r in zip((p, b), ref, strict=True):
            torch.testing.assert_close(t, r, rtol=0, atol=1e-6)


def _no_host_reads(self, *args, **kwargs):
    raise AssertionError("a capturable step read a tensor on the host")


def test_capturable_skip_on_the_kernels(fused, monkeypatch):
    """``nonfinite="skip"`` decided on the device around the fused kernels: a NaN gradient
    leaves every parameter and buffer as it was, without a host read; finite steps are the
    ``"ignore"`` steps."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    make = functools.partial(Scion, lr=torch.tensor(0.1), backend=fused.name, momentum=0.5,
                             capturable=True, norm_kwargs={"ns_dtype": torch.bfloat16})  # fmt: skip
    opt, ref = make(params, nonfinite="skip"), make(twins, nonfinite="ignore")
    for k in range(3):
        for p, t in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape)
            t.grad = p.grad.clone()
        if k == 1:
            params[1].grad[2] = float("nan")
        before = [p.detach().clone() for p in params]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in params if p in opt.state]
        with monkeypatch.context() as patched:
            patched.setattr(torch.Tensor, "item", _no_host_reads)
            opt.step()
        if k == 1:
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
            after = [opt.state[p]["momentum_buffer"] for p in params]
            assert all(torch.equal(a, b) for a, b in zip(after, buffers, strict=True))
            continue
        ref.step()
        assert all(torch.equal(p, t) for p, t in zip(params, twins, strict=True))
    assert int(opt.skipped_steps) == 1


def test_capturable_falls_back_where_a_backend_declares_no_capture(fused):
    """A backend whose capabilities say it cannot be captured: a capturable optimizer's
    parameters go to the reference, with the reason shown, and step as the reference does."""
    blind = copy.copy(fused)
    blind.capabilities = dataclasses.replace(fused.capabilities, capturable=False)
    p = nn.Parameter(torch.randn(6, 4))
    with backends.using(blind):
        opt = Scion([p], lr=torch.tensor(0.1), norm="Spectral", backend=fused.name,
                    nonfinite="ignore", capturable=True)  # fmt: skip
    route = opt._route(0, opt.param_groups[0])
    assert route.backends[0].name == "torch"
    assert route.fallbacks[0] == f"{fused.name} does not take capturable steps"
    ref = nn.Parameter(p.detach().clone())
    twin = Scion([ref], lr=torch.tensor(0.1), norm="Spectral", backend="torch",
                 nonfinite="ignore", capturable=True)  # fmt: skip
    p.grad = torch.randn(6, 4)
    ref.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, ref)


def test_steps_over_the_native_limit_never_reach_the_kernel(emulated_module):
    """``Spectral(steps=20)`` with ``backend="cuda"``: the native kernels run at most 16 steps,
    so the route sends it to the reference; the kernels are never called for it."""
    recording = Recording(NativeBackend(module=emulated_module))
    with backends.using(recording):
        w, b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8))
        groups = [{"params": [w], "norm": "Spectral", "norm_kwargs": {"steps": 20}},
                  {"params": [b], "norm": "BiasRMS"}]  # fmt: skip
        opt = Scion(groups, lr=0.1, backend="cuda")
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert [op for op, _ in recording.calls] == ["grouped_step_"]
    assert "20 Newton–Schulz steps (at most 16)" in repr(opt)


def test_preconditioned_presets_run_on_the_reference(emulated_module):
    """``coefficients="turbo_muon"`` (AOL preconditioning) with ``backend="cuda"``: the kernels
    normalize by the Frobenius norm only, so the route sends it to the reference, says why,
    and the step is the reference's."""
    recording = Recording(NativeBackend(module=emulated_module))
    with backends.using(recording):
        w = nn.Parameter(torch.randn(8, 4))
        twin = nn.Parameter(w.detach().clone())
        kwargs = {"coefficients": "turbo_muon"}
        opt = Scion([{"params": [w], "norm": "Spectral", "norm_kwargs": kwargs}], lr=0.1,
                    backend="cuda")  # fmt: skip
        ref = Scion([{"params": [twin], "norm": "Spectral", "norm_kwargs": kwargs}], lr=0.1,
                    backend="torch")  # fmt: skip
        w.grad = torch.randn_like(w)
        twin.grad = w.grad.clone()
        opt.step()
        ref.step()
    assert recording.calls == []
    assert "AOL preconditioning ('turbo_muon')" in repr(opt)
    assert torch.equal(w, twin)
    gram = Scion([{"params": [nn.Parameter(torch.randn(4, 16))], "norm": "Spectral",
                   "norm_kwargs": {**kwargs, "polar": "gram"}}], lr=0.1)  # fmt: skip
    assert "AOL (not gram: AOL preconditioning)" in repr(gram)


def test_print_says_whether_the_gram_form_runs():
    """``print(opt)`` says ``gram`` where ``polar="gram"`` runs the Gram form, and why not where
    its coefficients cancel too much for the compute dtype."""
    groups = [{"params": [nn.Parameter(torch.randn(shape))], "norm": "Spectral",
               "norm_kwargs": {"polar": "gram", "ns_dtype": torch.bfloat16,
                               "coefficients": coefficients}}
              for coefficients, shape in (("classic", (4, 16)), ("polar_express", (4, 16)),
                                          ("classic", (16, 4)), ("classic", (12, 16)))]  # fmt: skip
    lines = [ln for ln in repr(Scion(groups, lr=0.1)).splitlines() if "newton_schulz" in ln]
    assert lines[0].endswith("newton_schulz: bfloat16, gram")
    assert lines[1].endswith("bfloat16 (not gram: |b| + |c| reaches 38.4, over 8 in bfloat16)")
    assert lines[2].endswith("newton_schulz: bfloat16, gram")
    assert lines[3].endswith("bfloat16 (not gram: its matrices are squarer than 2:1)")


def test_format_groups_shows_the_backend_and_fallbacks(fused):
    """format_groups names the backend of every parameter, and why one fell back."""
    w, v = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    groups = [{"params": [w, v], "param_names": ["w", "v"], "norm": "Spectral",
               "backend": fused.name}]  # fmt: skip
    rows = {line.split()[0]: line for line in format_groups(groups).splitlines()[2:]}
    assert rows["w"].endswith(fused.name)
    assert rows["v"].endswith(f"torch ({fused.name} does not take float64 parameters)")


class _Stub(Backend):
    """A backend registered as ``"triton"`` for a test, whatever Triton this machine has:
    its capabilities, and the device answer ``why`` (``None``: runs anywhere)."""

    name = "triton"

    def __init__(self, capabilities: Capabilities, why: str | None = None) -> None:
        self.capabilities, self.why = capabilities, why

    def unavailable_reason(self, device):
        return super().unavailable_reason(device) or self.why


def test_format_groups_says_when_a_backend_cannot_run():
    """A backend that cannot run on the parameters' device is named with the reason below the
    table, and the reference's dtype shown: format_groups describes, it does not raise. An
    unknown backend name does raise."""
    with backends.using(_Stub(Capabilities(devices=("*",)), why="not on this machine")):
        groups = [{"params": [nn.Parameter(torch.randn(8, 4))], "backend": "triton"}]
        text = format_groups(groups)
        assert "torch (triton cannot run here)" in text
        assert text.endswith("not on this machine)")
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        format_groups([{"params": [nn.Parameter(torch.randn(8, 4))], "backend": "tritn"}])


def test_a_route_follows_a_parameter_cast():
    """A parameter cast to a dtype its backend does not take is routed again (a route
    remembers each parameter's dtype as well as its shape and device)."""

    with backends.using(_Stub(Capabilities(devices=("cpu",), tensor_dtypes=(torch.float32,)))):
        w = nn.Parameter(torch.randn(8, 4))
        opt = Scion([w], lr=0.1, norm="Sign", backend="triton")
        assert opt._route(0, opt.param_groups[0]).fallbacks == (None,)
        w.data = w.data.double()
        assert opt._route(0, opt.param_groups[0]).fallbacks == (
            "triton does not take float64 parameters",
        )


def test_registry():
    """Names resolve to the registered objects; ``using`` swaps one for a block and restores
    it; names are unique."""
    assert backends.names() == ("auto", "torch", "triton", "cuda")
    triton = backends.get("triton")
    other = TritonBackend(POLICIES, Policy(small_limit=0))
    with backends.using(other):
        assert backends.get("triton") is other
    assert backends.get("triton") is triton
    with pytest.raises(ValueError, match="cannot register"):
        backends.register(TritonBackend())
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.get("fast")


def test_policy_per_architecture():
    """The newest policy a device's compute capability has; the floor's below it."""
    policies = {(8, 0): "ampere", (9, 0): "hopper", (10, 0): "blackwell"}
    assert for_arch(policies, (8, 6)) == "ampere"
    assert for_arch(policies, (9, 0)) == "hopper"
    assert for_arch(policies, (12, 0)) == "blackwell"
    assert for_arch(policies, (7, 5)) == "ampere"


def test_devices_below_the_floor_are_refused(monkeypatch):
    """A GPU older than a backend's ``min_capability`` is refused, with the reason (here a
    CUDA device reported as compute capability 7.5); one at the floor is not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for backend in (TritonBackend(), NativeBackend(module=object())):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        why = below_floor(backend, cuda)
        assert why is not None and "compute capability 8.0" in why, why
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert below_floor(backend, cuda) is None


def test_devices_outside_the_declared_ones_are_refused():
    """A device type a backend does not declare is refused when the group is built."""
    with backends.using(_Stub(Capabilities(devices=("cuda",)))):
        with pytest.raises(ValueError, match="run on cuda tensors .got a cpu tensor"):
            Scion([nn.Parameter(torch.randn(4, 4))], backend="triton")


def test_a_buffer_dtype_outside_the_declared_ones_falls_back():
    """``buffer_dtype`` the kernels do not take (float64 buffers) is routed to the reference
    when the group is built, not refused inside the kernel call."""
    with backends.using(_Stub(Capabilities(devices=("*",)))):
        w = nn.Parameter(torch.randn(8, 4))
        opt = Scion([w], lr=0.1, momentum=0.5, norm="Sign", backend="triton",
                    buffer_dtype=torch.float64)  # fmt: skip
        route = opt._route(0, opt.param_groups[0])
        assert route.fallbacks == ("triton does not take float64 buffers",)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_reference_step_imports_no_kernels(backend, tmp_path):
    """A step on the reference path (``"auto"`` on a CPU is the reference), in one process and
    across ranks, imports neither the Triton kernels nor the native module."""

    code = textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        import scion_kernels as sk

        def step(**kwargs):
            w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
            opt = sk.Scion([w, b], backend={backend!r}, momentum=0.5, **kwargs)
            w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
            opt.step()

        step()
        dist.init_process_group("gloo", init_method="file://{tmp_path / "rendezvous"}",
                                rank=0, world_size=1)
        step(process_group=dist.group.WORLD)
        dist.destroy_process_group()
        prefixes = ("scion_kernels.backends.triton.", "scion_kernels.backends.cuda.native",
                    "scion_kernels._C")  # fmt: skip
        loaded = sorted(m for m in sys.modules if m.startswith(prefixes))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_groups_are_resolved_once(monkeypatch):
    """A group's route (its norm and each parameter's backend) is resolved when the group is
    added, and again only when its backend or norm options, or a parameter's shape or device,
    change; not at every step."""
    from scion_kernels import backends

    calls = []
    real = backends.route

    def counted(group, where, norm=None, capturable=False):
        calls.append(where)
        return real(group, where, norm, capturable)

    monkeypatch.setattr(backends, "route", counted)
    w = nn.Parameter(torch.randn(6, 4))
    opt = Scion([w], lr=0.1, backend="torch")
    assert calls == ["param group 0"]
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert len(calls) == 1
    opt.param_groups[0]["norm_kwargs"] = {"steps": 3}
    w.grad = torch.randn_like(w)
    opt.step()
    assert len(calls) == 2
    assert len(opt._routes[0].norm.pick((6, 4)).table) == 3
    w.data = torch.randn(4, 6)  # a parameter given another shape: resolved again
    w.grad = torch.randn_like(w)
    opt.step()
    assert len(calls) == 3
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        opt.param_groups[0]["backend"] = "fast"
        opt.step()


def test_routes_follow_groups_after_copy_and_under_compile():
    """Routes stay with their groups after a deepcopy and a group added later, and a compiled
    step follows a change of a group's norm, as an eager step does."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8))
    gw, gb = torch.randn(8, 4), torch.randn(8)

    def run(compiled: bool, change_norm: bool) -> list[torch.Tensor]:
        ws, bs = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
        opt = Scion([{"params": [ws], "norm": "Spectral"}], lr=0.1, nonfinite="ignore",
                    backend="torch")  # fmt: skip
        opt = copy.deepcopy(opt)
        ws = opt.param_groups[0]["params"][0]
        opt.add_param_group({"params": [bs], "norm": "BiasRMS"})
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for k in range(2):
            if change_norm and k == 1:
                opt.param_groups[0]["norm"] = "Sign"
            ws.grad, bs.grad = gw.clone(), gb.clone()
            step()
        return [ws.detach(), bs.detach()]

    torch._dynamo.reset()
    for change in (False, True):
        eager, compiled = run(False, change), run(True, change)
        for a, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(run(False, True)[0], run(False, False)[0])


def test_norm_options_changed_in_place_are_seen():
    coefficients = [[3.4445, -4.7750, 2.0315]] * 5
    p = nn.Parameter(torch.randn(6, 4))
    opt = Scion([p], norm="Spectral", norm_kwargs={"coefficients": coefficients},
                backend="torch")  # fmt: skip
    opt.param_groups[0]["norm_kwargs"]["coefficients"].append([1.875, -1.25, 0.375])
    p.grad = torch.randn_like(p)
    opt.step()
    assert len(opt._routes[0].norm.table) == 6
