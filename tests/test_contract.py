"""What every ``torch.optim`` optimizer promises, checked for Scion and ScionLight.

The kinds of checks PyTorch runs over its own optimizers: argument validation before the
parameters are read, tensor hyperparameters, state dicts that ``torch.load(weights_only=True)``
opens and that resume bit for bit, empty and complex parameters, ``torch.amp.GradScaler``,
copies and pickles.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from scion_kernels import Auto, Scion, ScionLight, Sign, Spectral

CLASSES = [Scion, ScionLight]
IDS = ["Scion", "ScionLight"]


def _step_with(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[torch.Tensor]):
    for p, g in zip(params, grads, strict=True):
        if isinstance(opt, ScionLight) and p.grad is not None:
            p.grad.add_(g.to(p.dtype))
        else:
            p.grad = g.to(p.dtype, copy=True)
    opt.step()


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_one_element_tensor_lr_is_a_number(cls):
    """A 1-element tensor ``lr`` (as schedulers and torch.compile users pass) steps as the same
    float, to the last bit or two: it is read on the device, so ``γ·ρ·u`` is rounded before it
    is added where a float ``lr`` rounds ``x − γ·ρ·u`` once."""
    results = []
    for lr in (0.1, torch.tensor(0.1), torch.tensor([0.1])):
        p = nn.Parameter(torch.linspace(-1.0, 1.0, 24).reshape(4, 6))
        opt = cls([p], lr=lr, norm="Spectral", momentum=0.5)
        for _ in range(3):
            _step_with(opt, [p], [torch.arange(24.0).reshape(4, 6).sin()])
        results.append(p.detach().clone())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=3 * 2**-23, atol=2**-24)
    assert not torch.equal(results[0], torch.linspace(-1.0, 1.0, 24).reshape(4, 6))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("shape", [(2,), (1, 2), (0,)], ids=str)
def test_tensor_lr_of_other_sizes_raises_value_error(cls, shape):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):  # torch's wording
        cls([nn.Parameter(torch.ones(3))], lr=torch.full(shape, 0.1))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_weight_decay_zero_is_accepted_and_any_other_refused(cls):
    """AdamW-style groupings give biases and gains ``weight_decay=0.0``: accepted, and the
    step is the one without it; a non-zero weight decay is refused, naming the optimizer."""
    p, q = nn.Parameter(torch.ones(4, 6)), nn.Parameter(torch.ones(4, 6))
    with_key = cls([{"params": [p], "weight_decay": 0.0}], lr=0.1, momentum=0.5)
    plain = cls([q], lr=0.1, momentum=0.5)
    g = torch.arange(24.0).reshape(4, 6) - 11.5
    _step_with(with_key, [p], [g.clone()])
    _step_with(plain, [q], [g.clone()])
    assert torch.equal(p, q)
    for wd in (0.01, torch.tensor(0.1)):
        with pytest.raises(ValueError, match=rf"weight_decay=.*which {cls.__name__} does not"):
            cls([{"params": [nn.Parameter(torch.ones(3))], "weight_decay": wd}], lr=0.1)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_errors_and_warnings_name_the_optimizer(cls):
    """ScionLight's messages say ScionLight, Scion's say Scion."""
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name} does not support complex parameters"):
        cls([nn.Parameter(torch.ones(3, dtype=torch.complex64))], lr=0.1)
    p = nn.Parameter(torch.ones(4, 6))
    opt = cls([p], lr=0.1, nonfinite="skip")
    p.grad = torch.full((4, 6), float("nan"))
    with pytest.warns(RuntimeWarning, match=rf"^{name} skipped a step"):
        opt.step()
    e = nn.Embedding(5, 3, sparse=True)
    opt = cls([e.weight], lr=0.1, norm="ColNorm")
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=rf"{name} does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
        ({"momentum": 0.0}, "Invalid momentum"),
        ({"scale": -2.0}, "Invalid scale"),
        ({"backend": "fast"}, "unknown backend"),
        ({"norm": "Frobenius"}, "unknown norm"),
    ],
    ids=["lr", "tensor-lr", "momentum", "scale", "backend", "norm"],
)
def test_options_are_checked_before_the_parameters_are_read(cls, kwargs, match):
    """A bad option raises before the parameter iterable is touched, as torch's optimizers
    do: a generator passed in is not consumed."""
    read = []

    def params():
        read.append(True)
        yield nn.Parameter(torch.ones(3, 4))

    with pytest.raises(ValueError, match=match):
        cls(params(), **kwargs)
    assert read == []


# ------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_parameters_are_refused(cls, dtype):
    """The step would drop the imaginary part; refuse at construction, naming the parameter."""
    w = nn.Parameter(torch.randn(4, 4, dtype=dtype))
    with pytest.raises(ValueError, match=r"complex parameters: parameter 'w' is torch.complex"):
        cls([("w", w)], lr=0.1)
    opt = cls([nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1


EMPTY = [(0, 5), (5, 0), (0, 2, 3, 3), (0,), (3, 0, 4)]
EMPTY_NORMS = [
    ("Auto", {}),
    ("Spectral", {"batch_dims": 1}),
    ("Sign", {}),
    ("ColNorm", {}),
    ("RowNorm", {"transpose": True}),
    ("BiasRMS", {}),
]


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("norm, kwargs", EMPTY_NORMS, ids=[n for n, _ in EMPTY_NORMS])
def test_parameters_without_elements_are_a_no_op(cls, norm, kwargs):
    """``(0, 5)``, ``(5, 0)``, ``(0, 2, 3, 3)``: step() and init() leave them alone and step
    the other parameters, as AdamW and Muon do."""
    ndim = {"Spectral": 3, "Sign": 2, "ColNorm": 2, "RowNorm": 2}.get(norm)
    shapes = [s for s in EMPTY if ndim is None or len(s) == ndim]
    full = (3, 4, 5) if ndim == 3 else (4, 5)
    params = [nn.Parameter(torch.zeros(s)) for s in shapes] + [nn.Parameter(torch.ones(full))]
    opt = cls(params, lr=0.1, momentum=0.5, norm=norm, norm_kwargs=kwargs)
    opt.init()
    before = params[-1].detach().clone()
    for _ in range(2):
        _step_with(opt, params, [torch.randn(p.shape) for p in params])
    assert all(p.shape == s for p, s in zip(params, shapes, strict=False))
    assert not torch.equal(params[-1], before)
    assert torch.isfinite(params[-1]).all()


# ------------------------------------------------------------------------------ state dicts
def _norm_instance_groups(model: nn.Sequential) -> list[dict]:
    return [
        {"params": [model[0].weight], "norm": Spectral(max=True)},
        {"params": [model[1].weight], "norm": Sign(zero_init=True), "scale": 10.0},
        {"params": [model[0].bias, model[1].bias], "norm": Auto(eps=1e-6)},
    ]


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_state_dict_of_norm_instances_loads_with_weights_only(cls):
    """A group built with a Norm instance (documented API) stores the norm as its name and
    options: the state dict is plain data, ``torch.load(weights_only=True)`` opens it, the
    loaded optimizer steps exactly as the original, and two optimizers built the same way
    give equal state dicts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    opt = cls(_norm_instance_groups(model), lr=0.1, momentum=0.5)
    other = cls(_norm_instance_groups(twin), lr=0.1, momentum=0.5)
    grads = [torch.randn(p.shape) for p in model.parameters()]
    _step_with(opt, list(model.parameters()), grads)
    _step_with(other, list(twin.parameters()), grads)
    state = opt.state_dict()
    assert [(g["norm"], g["norm_kwargs"]) for g in state["param_groups"]] == [
        ("Spectral", {"max": True}),
        ("Sign", {"zero_init": True}),
        ("Auto", {"eps": 1e-6}),
    ]
    assert state["param_groups"] == other.state_dict()["param_groups"]
    loaded = _roundtrip(state)
    resumed = cls(_norm_instance_groups(twin), lr=0.1, momentum=0.5)
    resumed.load_state_dict(loaded)
    more = [torch.randn(p.shape) for p in model.parameters()]
    _step_with(opt, list(model.parameters()), more)
    _step_with(resumed, list(twin.parameters()), more)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_norm_given_by_instance_or_name_gives_equal_state_dicts():
    p, q = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    a = Scion([p], norm=Spectral(), lr=0.1).state_dict()
    b = Scion([q], norm="Spectral", lr=0.1).state_dict()
    assert a["param_groups"] == b["param_groups"]


BUFFERS = [
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, None),
]


@pytest.mark.parametrize("param_dtype, buffer_dtype", BUFFERS, ids=str)
def test_resume_keeps_buffer_dtype_bit_for_bit(param_dtype, buffer_dtype):
    """``load_state_dict`` keeps each buffer in the dtype it was saved in (torch.optim's
    loader would cast a float32 average of bf16 weights to bf16): the resumed run's next
    steps equal the uninterrupted run's, bit for bit."""
    torch.manual_seed(0)
    shapes = [(8, 6), (6,), (3, 5)]

    def groups(ps: list[nn.Parameter]) -> list[dict]:
        return [
            {"params": ps[:2], "norm": "Auto", "norm_kwargs": {"ns_dtype": torch.float32}},
            {"params": ps[2:], "norm": "RowNorm"},
        ]

    start = [torch.randn(s).to(param_dtype) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    runs = []
    for resume in (False, True):
        params = [nn.Parameter(w.clone()) for w in start]
        opt = Scion(groups(params), lr=0.05, momentum=0.3, buffer_dtype=buffer_dtype)
        for step, gs in enumerate(grads):
            if resume and step == 2:
                state = _roundtrip(opt.state_dict())
                params = [nn.Parameter(p.detach().clone()) for p in params]
                opt = Scion(groups(params), lr=0.05, momentum=0.3, buffer_dtype=buffer_dtype)
                opt.load_state_dict(state)
                for p in params:
                    want = buffer_dtype or param_dtype
                    assert opt.state[p]["momentum_buffer"].dtype == want
            _step_with(opt, params, gs)
        runs.append(
            [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
        )
    for a, b in zip(*runs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_scionlight_copies_still_save_their_average(how):
    """A pickled or deep-copied ScionLight keeps saving the average held in ``p.grad``."""
    p = nn.Parameter(torch.randn(4, 6))
    opt = ScionLight([p], lr=0.1, momentum=0.5, norm="Sign")
    _step_with(opt, [p], [torch.randn(4, 6)])
    clone = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    (q,) = clone.param_groups[0]["params"]
    state = clone.state_dict()["state"][0]
    assert torch.equal(state["grad_state"], q.grad)


# ------------------------------------------------------------------------------ GradScaler
def _scaled_run(cls, steps: int, momentum: float, overflow_at: int = 0):
    """``steps`` GradScaler steps of a tiny model with fp16 gradients' habits: the loss is
    scaled, backward, scaler.step, scaler.update. At ``overflow_at`` the loss is inf. Scales
    are powers of two (unscaling is exact) and Newton–Schulz is float32 on any CPU, so two
    optimizers that unscale differently still see the same bits."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = cls(
        model.parameters(), lr=0.05, momentum=momentum, norm_kwargs={"ns_dtype": torch.float32}
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    applied = 0
    for step in range(steps):
        if cls is Scion or momentum == 1.0:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if step == overflow_at:
            loss = loss * float("inf")
        before = model.weight.detach().clone()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        applied += not torch.equal(before, model.weight)
    return model, applied


def test_scion_with_gradscaler_skips_only_the_overflow():
    model, applied = _scaled_run(Scion, steps=6, momentum=0.5)
    assert applied == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scionlight_with_gradscaler_and_averaging_is_refused():
    """ScionLight's average lives in p.grad, which GradScaler unscales and poisons on
    overflow: refused with a clear error before anything changes."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = ScionLight(model.parameters(), lr=0.05, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 6)).square().mean()).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="ScionLight cannot be used with torch.amp.GradScaler"):
        scaler.step(opt)
    for p, (w, g) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, w) and torch.equal(p.grad, g)


def test_scionlight_without_averaging_under_gradscaler_is_scions_step():
    """momentum == 1: ScionLight unscales and skips the overflow itself, as Scion does."""
    light, applied_light = _scaled_run(ScionLight, steps=4, momentum=1.0, overflow_at=1)
    plain, applied_plain = _scaled_run(Scion, steps=4, momentum=1.0, overflow_at=1)
    assert applied_light == applied_plain == 3
    for a, b in zip(light.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
