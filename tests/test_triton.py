"""The Triton backend's own tests: its paths, tuning, tables and errors.

Its parity with the reference (and with the native backend) is in ``test_backends.py``. Without
a GPU these run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) on small shapes;
on a GPU they run compiled. They check tile choices, tables and error messages, not values
against a tolerance (the tolerance rules are in ``test_backends.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scion_kernels import Scion, backends
from scion_kernels.backends.triton import Policy, TritonBackend, interpreting, unavailable_reason
from scion_kernels.newton_schulz import resolve_coefficients

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
REASON = unavailable_reason(DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"Triton kernels: {REASON}")

if REASON is None:
    from scion_kernels.backends.triton import tuning
    from scion_kernels.backends.triton.newton_schulz import polar


def test_paths_by_shape():
    assert tuning.NSBucket(1, 33, 100, torch.bfloat16, DEVICE).small  # pads to 64×128
    assert not tuning.NSBucket(1, 65, 100, torch.bfloat16, DEVICE).small  # 128 rows
    assert not tuning.NSBucket(1, 16, 1000, torch.bfloat16, DEVICE).small  # 16×1024 elements
    tiled = Policy(small_limit=0)
    assert not tuning.NSBucket(1, 1, 5, torch.bfloat16, DEVICE, tiled).small


def test_polar_rejects_bad_input():
    table = resolve_coefficients("classic")
    with pytest.raises(ValueError, match="matrices"):
        polar(torch.randn(5, device=DEVICE), table)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        polar(torch.randn(4, 4, device=DEVICE), table, torch.float32)


@pytest.mark.skipif(CUDA, reason="checks the CPU error message")
def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not interpreting()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        Scion([nn.Parameter(torch.randn(4, 4))], backend="triton")


# Timing runs compute on scratch buffers whose contents are arbitrary (overwritten afterwards);
# the interpreter's numpy warns when such garbage overflows.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_tuning_picks_fastest_and_touches_no_state(monkeypatch, mixed_params):
    """The tuner times scratch-only launches: a tuned step equals a step that starts from the
    configurations it picked, bit for bit (no parameter or buffer was written twice)."""
    slow = dict(num_warps=4, num_stages=1)
    syrk = (dict(BLOCK=16, BLOCK_K=16, **slow), dict(BLOCK=32, BLOCK_K=16, **slow))
    apply = (
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, **slow),
        dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, **slow),
    )
    # The interpreter's policy and the GPU's: the test runs on either.
    tuned = TritonBackend().with_policy(syrk=syrk, apply=apply, small_limit=0, autotune=True)
    timed = []

    def fake_time(fn):  # runs the launch once; the second candidate is "faster"
        fn()
        timed.append(1)
        return 1.0 / len(timed) if len(timed) % 2 == 0 else 1.0

    monkeypatch.setattr(tuning, "time_launch", fake_time)
    monkeypatch.setattr(tuning, "TUNED", {})
    results = []
    for _ in range(2):  # first run tunes; the second finds every choice made
        groups, params = mixed_params.with_gradients(DEVICE)
        with backends.using(tuned):
            Scion(groups, lr=0.1, momentum=0.5, backend="triton").step()
        results.append(params)
        if len(results) == 1:
            count = len(timed)
    assert count > 0 and len(timed) == count  # nothing timed on the second run
    faster = (syrk[1], apply[1])
    assert tuning.TUNED and all(cfg in faster for cfg in tuning.TUNED.values())
    for tuned, chosen in zip(*results, strict=True):
        assert torch.equal(tuned, chosen)


def test_tuning_passes_over_a_failing_candidate(monkeypatch):
    """A candidate whose launch fails (a compiler error, say) is passed over with a warning
    naming it, and the others still compete; when none can run, the error says so."""
    good, bad = dict(BLOCK=16), dict(BLOCK=32, TMA=1)

    def launch(config):
        if config is bad:
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(tuning, "time_launch", lambda fn: fn() or 1.0)
    with pytest.warns(RuntimeWarning, match=r"'TMA': 1.*PassManager::run failed"):
        assert tuning._fastest([bad, good], launch) is good
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no tile configuration"):
        tuning._fastest([bad], launch)


def test_view_strides_agree_with_view():
    """The copy-free test the dispatch uses agrees with ``Tensor.view`` on random layouts."""
    from scion_kernels.backends.tables import view_strides

    gen = torch.Generator().manual_seed(5)

    def draw(high: int) -> int:
        return int(torch.randint(1, high, (1,), generator=gen))

    outcomes = set()
    for _ in range(400):
        shape = [draw(4) for _ in range(draw(5))]
        t = torch.empty(shape).permute(torch.randperm(len(shape), generator=gen).tolist())
        if draw(3) == 1:  # a strided slice of the last dimension
            t = t[..., ::2]
        n, last = t.numel(), t.shape[-1]
        for new in ((n,), (1, n), (n // last, 1, last), (1, 1, n)):
            try:
                want = tuple(t.view(new).stride())
            except RuntimeError:
                want = None
            assert view_strides(t.shape, t.stride(), new) == want, (t.shape, t.stride(), new)
            outcomes.add(want is None)
    assert outcomes == {True, False}


def test_tables_kept_between_steps(mixed_params):
    """Steps on the same tensors (gradients accumulated in place) copy no new table."""
    from scion_kernels.backends import tables

    tables._TABLES.clear()
    groups = mixed_params.groups(DEVICE)
    params = mixed_params.params(groups)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = Scion(groups, lr=0.1, momentum=0.5, backend="triton")
    kept = []
    for step_grads in mixed_params.gradients(groups, 3):
        for p, g in zip(params, step_grads, strict=True):
            p.grad.copy_(g)
        opt.step()
        kept.append(list(tables._TABLES))
    assert kept[0] and kept[1] == kept[0] and kept[2] == kept[0]


def test_kernels_launch_on_the_parameters_device(monkeypatch, mixed_params):
    """Every Triton op makes the parameters' device current while it launches (Triton launches
    on the current device, whatever device the tensors are on)."""
    from scion_kernels.backends.triton import grouped as krw
    from scion_kernels.backends.triton import newton_schulz as kns
    from scion_kernels.backends.triton import on_device

    seen = []

    def recording(device):
        seen.append(device)
        return on_device(device)

    monkeypatch.setattr(kns, "on_device", recording)
    monkeypatch.setattr(krw, "on_device", recording)
    groups, params = mixed_params.with_gradients(DEVICE)
    Scion(groups, lr=0.1, momentum=0.5, backend="triton").step()
    assert len(seen) >= 2 and set(seen) == {params[0].device}
    guard = on_device(torch.device("cuda", 1))  # made without a GPU; entered only on one
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_tables_while_a_cuda_graph_is_captured(monkeypatch):
    """During a capture a table must exist already (a new one would allocate and copy inside
    the graph): a clear error. One used in a capture is never evicted, since replays read it."""
    from scion_kernels.backends import tables

    monkeypatch.setattr(tables, "_TABLES", {})
    monkeypatch.setattr(tables, "_CAPTURED", {})
    monkeypatch.setattr(tables, "TABLE_CACHE_SIZE", 4)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    kept = torch.arange(3)
    tables._TABLES[("kept",)] = kept  # made before the capture (no GPU needed here)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="captured"):
        tables.cached(("new",), lambda: torch.arange(2), gpu)
    assert tables.cached(("kept",), lambda: torch.arange(9), gpu) is kept
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for i in range(10):  # fill the cache past its size: the captured table stays
        tables.cached(("other", i), lambda: torch.zeros(1), cpu)
    assert len(tables._TABLES) <= 4
    assert tables.cached(("kept",), lambda: torch.arange(9), gpu) is kept


def test_table_cache_keeps_the_most_recently_used(monkeypatch):
    """A full cache drops the table used longest ago, not the one made first: a table every
    step asks for stays while others come and go."""
    from scion_kernels.backends import tables

    monkeypatch.setattr(tables, "_TABLES", {})
    monkeypatch.setattr(tables, "TABLE_CACHE_SIZE", 3)
    cpu = torch.device("cpu")
    hot = tables.cached(("hot",), lambda: torch.ones(1), cpu)
    for i in range(10):
        tables.cached(("cold", i), lambda: torch.zeros(1), cpu)
        assert tables.cached(("hot",), lambda: torch.full((1,), 2.0), cpu) is hot
    assert len(tables._TABLES) == 3
