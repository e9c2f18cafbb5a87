"""The reference step under ``torch.compile``, as torch documents it for its own optimizers: a
compiled function calling ``opt.step()``, a tensor ``lr`` driven by a scheduler. It compiles to
as many graphs as torch's Adam in the same pattern and never recompiles as the ``lr`` changes;
with ``fullgraph=True`` (once the state exists) it traces whole and steps as the eager step."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import GraphRecorder
from torch import nn

from scion_kernels import Scion, ScionLight


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.LayerNorm(8))


def _cosine(step: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / STEPS))


def _graphs_over_a_schedule(make_opt, steps: int) -> tuple[int, int]:
    """Graphs compiled after 3 steps and after ``steps`` steps of a model trained with a
    compiled ``opt.step()`` and a tensor ``lr`` under ``LambdaLR`` (cosine)."""
    torch._dynamo.reset()
    model = _model()
    opt = make_opt(model.parameters())
    recorder = GraphRecorder()
    warm = recorder.over_a_schedule(model, opt, torch.randn(4, 16), _cosine, steps)
    assert opt.param_groups[0]["lr"].item() != 0.01  # the schedule moved lr
    return warm, len(recorder.graphs)


#: The schedule's length: a cosine over 1,000 steps.
STEPS = 1000


def _trained(make_opt, schedule, steps: int, recorder=None, warm: bool = False) -> list:
    """The parameters of a fresh model after ``steps`` steps on one batch with
    ``make_opt(params)``, ``schedule(opt, k)`` run before step ``k``; the step compiled by
    ``recorder`` (``fullgraph=True``) where given, after one eager step where ``warm``."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    model = _model()
    opt = make_opt(model.parameters())
    if warm:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    step = opt.step if recorder is None else recorder.compile(opt.step)
    for k in range(steps):
        schedule(opt, k)
        model(x).square().mean().backward()
        step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@functools.cache
def _adams_graphs() -> int:
    """The control: torch's Adam in the same pattern compiles this many graphs, and does not
    recompile either."""
    warm, end = _graphs_over_a_schedule(
        lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.01)), STEPS
    )
    assert end == warm
    return end


@pytest.mark.parametrize("cls", [Scion, ScionLight], ids=["Scion", "ScionLight"])
def test_compiled_step_under_a_scheduler_is_adams_graph_count_and_never_recompiles(cls):
    """A cosine schedule moving ``lr`` every step: after the first steps no graph is compiled
    again, and the step has as many graphs as torch's Adam in the same pattern."""
    warm, end = _graphs_over_a_schedule(
        lambda ps: cls(ps, lr=torch.tensor(0.01), norm="Auto", nonfinite="ignore", momentum=0.1),
        STEPS,
    )
    assert end == warm
    assert end == _adams_graphs()


def test_compiled_step_after_load_state_dict_traces_whole(graph_recorder):
    """Loading a state dict copies a tensor ``lr``; the options are checked while loading, so a
    ``fullgraph=True`` step right after it has no value to read on the host."""
    x = torch.randn(4, 16)
    model = _model()
    make = functools.partial(Scion, lr=torch.tensor(0.01), norm="Auto", nonfinite="ignore",
                             momentum=0.1)  # fmt: skip
    opt = make(model.parameters())
    model(x).square().mean().backward()
    opt.step()
    again = make(model.parameters())
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["lr"] is not opt.param_groups[0]["lr"]
    graph_recorder.compile(again.step)()
    assert len(graph_recorder.graphs) == 1


@pytest.mark.parametrize("polar", ["newton_schulz", "gram"])
def test_compiled_step_matches_eager_with_an_lr_changed_in_place(graph_recorder, polar):
    """``fullgraph=True`` after the first (eager) step: the whole reference step traces, and a
    tensor ``lr`` changed in place between steps (as schedulers do) is read at each step; the
    parameters match the eager step's to rounding, the plain iteration's and the Gram form's
    (float32 Newton–Schulz: in bf16 a last-bit difference in an input is amplified by the
    iteration on small singular values)."""
    options = {"ns_dtype": torch.float32, "polar": polar}

    def make(params):
        return Scion(params, lr=torch.tensor(0.01), norm="Auto", nonfinite="ignore",
                     momentum=0.1, norm_kwargs=options)  # fmt: skip

    def schedule(opt, k):
        opt.param_groups[0]["lr"].fill_(0.01 * _cosine(100 * k))

    results = [
        _trained(make, schedule, 4, recorder, warm=True) for recorder in (None, graph_recorder)
    ]
    assert len(graph_recorder.graphs) == 1
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    frozen = _model()
    assert not torch.allclose(results[0][0], next(frozen.parameters()))


# ------------------------------------------------------------------------------- capturable


def test_capturable_step_reads_no_tensor_option_on_the_host(monkeypatch):
    """``capturable=True``: an eager step reads no tensor on the host through ``.item()``
    (tensor options are checked when replaced), its first step included, and a ``lr``
    changed in place is what the step uses."""
    model, twin = _model(), _model()
    x = torch.randn(4, 16)
    make = functools.partial(Scion, lr=torch.tensor(0.01), norm="Auto", nonfinite="ignore",
                             momentum=0.1)  # fmt: skip
    opts = [make(model.parameters(), capturable=True), make(twin.parameters())]
    for k in range(3):
        for m, opt in zip((model, twin), opts, strict=True):
            opt.param_groups[0]["lr"].fill_(0.01 * _cosine(50 * k))
            m(x).square().mean().backward()
            if opt is opts[0]:
                with monkeypatch.context() as patched:
                    patched.setattr(torch.Tensor, "item", _no_host_reads)
                    opt.step()
            else:
                opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def _no_host_reads(self, *args, **kwargs):
    raise AssertionError("a capturable step read a tensor on the host")


def test_capturable_step_traces_whole_from_its_first_step(graph_recorder):
    """``fullgraph=True`` on the very first step: the state is made while tracing, and nothing
    in the step depends on a tensor's value."""
    model = _model()
    opt = Scion(model.parameters(), lr=torch.tensor(0.01), norm="Auto", nonfinite="ignore",
                momentum=0.1, capturable=True)  # fmt: skip
    model(torch.randn(4, 16)).square().mean().backward()
    graph_recorder.compile(opt.step)()
    assert len(graph_recorder.graphs) == 1
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (Scion, {}, ValueError, "needs nonfinite='skip' .* or 'ignore': nonfinite='raise' reads"),
        (ScionLight, {"nonfinite": "skip"}, ValueError, "not available for ScionLight: its"),
        (Scion, {"capturable": 1, "nonfinite": "ignore"}, TypeError, "capturable must be a bool"),
        (
            Scion,
            {"nonfinite": "ignore", "scale": torch.tensor(2.0)},
            ValueError,
            r"takes scale as numbers \(fixed into a captured graph\); lr and momentum may be",
        ),
    ],
)
def test_capturable_refuses_what_reads_on_the_host(cls, kwargs, error, match):
    kwargs.setdefault("capturable", True)
    with pytest.raises(error, match=match):
        cls(_model().parameters(), lr=torch.tensor(0.01), **kwargs)


def test_capturable_skip_puts_everything_back_on_a_nonfinite_gradient(monkeypatch):
    """``capturable=True, nonfinite="skip"``: a step whose gradients are all finite is the
    ``"ignore"`` step, bit for bit; a step with a NaN or inf anywhere leaves every parameter
    and averaging buffer as it was, counts the skip in a device tensor, and reads nothing on
    the host (no ``Tensor.item()``), its first step included."""
    x = torch.randn(4, 16)
    model, twin = _model(), _model()
    make = functools.partial(Scion, lr=torch.tensor(0.01), norm="Auto", momentum=0.1,
                             capturable=True)  # fmt: skip
    opt = make(model.parameters(), nonfinite="skip")
    ref = make(twin.parameters(), nonfinite="ignore")
    assert isinstance(opt.skipped_steps, torch.Tensor) and int(opt.skipped_steps) == 0
    bad = {1: float("nan"), 3: float("inf")}
    for k in range(5):
        for m in (model, twin):
            m.zero_grad()
            m(x).square().mean().backward()
        params = list(model.parameters())
        if k in bad:
            params[k].grad.view(-1)[0] = bad[k]
        before = [p.detach().clone() for p in params]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in params if p in opt.state]
        with monkeypatch.context() as patched:
            patched.setattr(torch.Tensor, "item", _no_host_reads)
            opt.step()
        if k in bad:
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
            after = [opt.state[p]["momentum_buffer"] for p in params]
            assert all(torch.equal(a, b) for a, b in zip(after, buffers, strict=True))
            continue
        ref.step()
        for a, b in zip(params, twin.parameters(), strict=True):
            assert torch.equal(a, b)
    assert int(opt.skipped_steps) == 2


def test_capturable_skip_traces_whole(graph_recorder):
    """The device-side skip has no data-dependent branch: ``fullgraph=True`` traces it, and the
    compiled step puts the parameters back on a NaN gradient as the eager one does."""
    model = _model()
    opt = Scion(model.parameters(), lr=torch.tensor(0.01), norm="Auto", nonfinite="skip",
                momentum=0.1, capturable=True)  # fmt: skip
    model(torch.randn(4, 16)).square().mean().backward()
    step = graph_recorder.compile(opt.step)
    step()
    params = list(model.parameters())
    params[0].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in params]
    step()
    assert len(graph_recorder.graphs) == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert int(opt.skipped_steps) == 1


def test_tensor_momentum_warm_up_compiles_once(graph_recorder):
    """A momentum warm-up (α from 0.15 down to 0.05 over the first steps, as modded-nanogpt
    schedules Muon's β) with a tensor ``momentum`` changed in place: the compiled step is one
    graph and steps as the eager step with the same numbers, to rounding (``α·g`` formed
    apart); a capturable step reads no tensor on the host."""
    options = {"ns_dtype": torch.float32}

    def make(params, momentum=None):
        return Scion(params, lr=torch.tensor(0.01), norm="Auto", nonfinite="ignore",
                     momentum=torch.tensor(0.15) if momentum is None else momentum,
                     capturable=momentum is None, norm_kwargs=options)  # fmt: skip

    def schedule(opt, k):
        if isinstance(opt.param_groups[0]["momentum"], torch.Tensor):
            opt.param_groups[0]["momentum"].fill_(0.15 - 0.02 * k)
        else:
            opt.param_groups[0]["momentum"] = 0.15 - 0.02 * k

    eager, compiled = (_trained(make, schedule, 6, recorder) for recorder in (None, graph_recorder))
    assert len(graph_recorder.graphs) == 1
    by_number = _trained(functools.partial(make, momentum=0.15), schedule, 6)
    for a, b, c in zip(eager, compiled, by_number, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_capturable_survives_a_pickle():
    import pickle

    opt = Scion(_model().parameters(), nonfinite="ignore", capturable=True)
    assert pickle.loads(pickle.dumps(opt)).capturable
