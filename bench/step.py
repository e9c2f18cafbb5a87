"""Whole optimizer steps over real models' parameter sets: time and optimizer-state memory.

For each model (GPT-2 small, ViT-S/16, ResNet-18, built here by hand with their real parameter
shapes), gradients are set once (fixed seed, random and non-zero) and one ``optimizer.step()``
is timed repeatedly (``Context.time_ms``; ``zero_grad`` and backward are never timed). Compared:

- ``Scion`` and ``ScionLight`` with the recipe's groups, once per step backend of
  ``scion_kernels`` (``backends.names()`` minus ``"auto"``);
- ``reference_per_param``: the authors' ``scion.py`` step restated, one parameter at a time
  (the baseline the batched step must beat);
- peers: ``torch.optim.Muon`` on the 2-D hidden matrices plus ``AdamW`` on the rest,
  ``pytorch_optimizer.SCION`` with equivalent groups (constrained), and fused ``AdamW``.

Candidates are timed in interleaved rounds (``ROUNDS``; ``ms`` is the median over rounds, the
note gives the range), on one set of parameters with the gradients reset before each round. A
candidate whose first call takes longer than ``SLOW_CALL_S`` (a bf16 Newton–Schulz on a CPU
without bf16 matrix instructions) is timed by that one call instead, and says so; a quick run
skips a candidate whose calls are predicted to exceed its budget
(:meth:`bench.common.Context.too_slow`), and says why.

``tflops`` is the dense Newton–Schulz count of the matrices a candidate orthogonalizes
(:func:`bench.common.newton_schulz_flops`, 5 steps each) over its step time, and
``ceiling_fraction`` that rate over the matrix rate of its compute dtype (``dtype``) measured in
the same run: for Scion the dtype Newton–Schulz runs in here (float32 on a CPU without bf16
matrix instructions, else bf16), for Muon and pytorch_optimizer's SCION bf16, always.

``state_bytes`` is measured, not computed: the bytes of every tensor in the optimizer's
``state`` after the timed steps (each storage counted once; parameter and gradient storages
excluded). ScionLight keeps its average in ``p.grad`` and so counts 0 extra bytes. On CUDA the
note adds the ``torch.cuda.memory_allocated()`` growth over building and a first step,
``peak_bytes`` is the peak of allocated memory during that first step beyond what was allocated
before the optimizer was built (state plus workspace, the most a step ever needs beyond
parameters and gradients), and ``first_s`` the seconds of that first step (compilation
included).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import scion_kernels
from scion_kernels import RECIPES, Recipe, ScionLight, Spectral, make_norm, param_groups
from scion_kernels.backends import names as backend_names
from scion_kernels.newton_schulz import default_compute_dtype

from .common import Context, newton_schulz_flops
from .models import GPT2, ResNet18, ViT

SEED = 0
#: Step backends of scion_kernels measured here (adding one to the library adds it here).
OUR_BACKENDS = tuple(b for b in backend_names() if b != "auto")
#: Blocks of GPT-2 small kept in a quick run on a CPU (see ``model_specs``).
QUICK_CPU_GPT2_LAYERS = 1
#: Timing rounds: every candidate is timed once per round, in alternating order, and its
#: ``ms`` is the median over rounds (a shared CPU drifts; interleaving spreads the drift).
ROUNDS = 3
#: A candidate whose first call takes longer than this (seconds) is timed by that call alone.
SLOW_CALL_S = 20.0


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: its name, builder, recipe name and a note on what it is."""

    name: str
    build: Callable[[], nn.Module]
    recipe: str
    note: str = ""


def model_specs(ctx: Context) -> list[ModelSpec]:
    """The models measured in this run.

    Full size everywhere except quick runs on a CPU, where GPT-2 small keeps its first
    ``QUICK_CPU_GPT2_LAYERS`` blocks: its 12 blocks cost 1.5 TFLOP of Newton–Schulz per step
    (4 s on a 2-core CPU with bf16 matrix units, 10 s in float32 on one without), which with
    several candidates and interleaved rounds takes minutes; the reduced model has the same
    matrix shapes, embeddings and tied head. ``--full`` on a CPU measures the whole model.
    The check suite measures GPT-2 small only (on a CPU, its layout at width 64).
    """
    if ctx.suite == "check":
        if ctx.tiny:
            tiny = lambda: GPT2(n_layer=1, dim=64, vocab=256, context=64)  # noqa: E731
            return [ModelSpec("gpt2-tiny", tiny, "gpt", "GPT-2 layout at width 64 (plumbing)")]
        return [ModelSpec("gpt2-small", lambda: GPT2(n_layer=12), "gpt", "tied wte/lm_head")]
    if ctx.quick and ctx.device.type == "cpu":
        n = QUICK_CPU_GPT2_LAYERS
        gpt2 = ModelSpec(
            f"gpt2-small-{n}L",
            lambda: GPT2(n_layer=n),
            "gpt",
            f"GPT-2 small with {n} of its 12 blocks (quick CPU run); tied wte/lm_head",
        )
    else:
        gpt2 = ModelSpec("gpt2-small", lambda: GPT2(n_layer=12), "gpt", "tied wte/lm_head")
    return [gpt2, ModelSpec("vit-s16", ViT, "vit"), ModelSpec("resnet18", ResNet18, "cnn")]


def check_groups(name: str, model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> None:
    """Raise if ``param_groups`` did not give ``model`` the roles this benchmark expects."""
    by_role: dict[str, list[Mapping[str, Any]]] = {}
    for g in groups:
        by_role.setdefault(g["role"], []).append(g)
    n_groups = sum(len(g["params"]) for g in groups)
    n_model = len(list(model.parameters()))
    problems = [] if n_groups == n_model else [f"{n_groups} grouped of {n_model} parameters"]

    def count(role: str, norm: str | None = None, ndim: int | None = None) -> int:
        return sum(
            1
            for g in by_role.get(role, [])
            if norm is None or g["norm"] == norm
            for p in g["params"]
            if ndim is None or p.ndim == ndim
        )

    if name.startswith("gpt2"):
        n_layer = len(model.transformer.h)
        head = by_role.get("head", [])
        if count("hidden", "Spectral", 2) != 4 * n_layer or count("hidden") != 4 * n_layer:
            problems.append(f"hidden: want {4 * n_layer} Spectral matrices")
        if (
            len(head) != 1
            or head[0]["norm"] != "Sign"
            or len(head[0]["params"]) != 1
            or head[0]["params"][0] is not model.lm_head.weight
        ):
            problems.append("head: want Sign on the tied wte/lm_head weight")
        if count("vector") != count("vector", "BiasRMS") or count("vector") != 8 * n_layer + 2:
            problems.append(f"vector: want BiasRMS on {8 * n_layer + 2} vectors")
    elif name.startswith("vit"):  # param_groups resolves the recipe's Auto per layer
        if count("hidden", "Spectral", 2) != 4 * len(model.blocks):
            problems.append("hidden: want Spectral on the block matrices")
        if count("head", "Sign") != 1 or count("input", "SpectralConv", 4) != 1:
            problems.append("want Sign on the head and SpectralConv on the patch embedding")
    elif name.startswith("resnet"):
        if count("hidden", "SpectralConv", 4) != 19 or count("input", "SpectralConv", 4) != 1:
            problems.append("want SpectralConv on the stem and 19 other convs")
        if count("head", "Sign") != 1:
            problems.append("want Sign on the fc head")
    if problems:
        raise RuntimeError(f"param_groups({name}) gave unexpected roles: {'; '.join(problems)}")


# ------------------------------------------------------------------- the per-parameter baseline
class PerParamReference:
    """The authors' ``scion.py`` step restated: a Python loop over parameters, one LMO each.

    For every parameter: ``buf.mul_(1 − α).add_(g, alpha=α)``; ``u = ρ·lmo(buf)`` with the
    group's :mod:`scion_kernels.norms` object applied to that one tensor; then
    ``p.mul_(1 − γ)`` (constrained) and ``p.add_(u, alpha=−γ)``.
    """

    def __init__(
        self,
        groups: Iterable[Mapping[str, Any]],
        lr: float,
        momentum: float,
        unconstrained: bool = False,
    ) -> None:
        self.param_groups = [
            {
                "params": list(g["params"]),
                "norm": g["norm"],
                "norm_kwargs": dict(g.get("norm_kwargs") or {}),
                "scale": float(g["scale"]),
                "lr": lr,
                "momentum": momentum,
                "unconstrained": unconstrained,
            }
            for g in groups
        ]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One step over every parameter that has a gradient."""
        for group in self.param_groups:
            lr, momentum, scale = group["lr"], group["momentum"], group["scale"]
            norm = make_norm(group["norm"], group["norm_kwargs"])
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if momentum != 1.0:
                    state = self.state.setdefault(p, {})
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(1.0 - momentum).add_(g, alpha=momentum)
                    g = buf
                update = norm.lmo(g).mul_(scale)
                if not group["unconstrained"]:
                    p.mul_(1.0 - lr)
                p.add_(update, alpha=-lr)


# --------------------------------------------------------------------------- the candidates
class Skip(Exception):
    """A candidate that cannot run on this model or machine; the message says why."""


@dataclass
class Built:
    """A ready candidate: what one step does, the state mappings to measure, a note, and the
    Newton–Schulz work of one step (dense FLOPs, compute dtype; none for AdamW)."""

    step: Callable[[], Any]
    states: list[Mapping[Any, Any]]
    note: str = ""
    flops: float = 0.0
    dtype: torch.dtype | None = None


def spectral_flops(groups: Iterable[Mapping[str, Any]]) -> float:
    """Dense FLOPs of one step's Newton–Schulz over ``groups``: every parameter whose norm
    (``Auto`` resolved) is Spectral-family, each of its matrices oriented wide."""
    total = 0.0
    for g in groups:
        norm = make_norm(g["norm"], g.get("norm_kwargs") or {})
        for p in g["params"]:
            picked = norm.pick(p.shape)
            if isinstance(picked, Spectral) and picked.polar == "newton_schulz":
                batch, r, c = picked.matrix_shape(p.shape)
                total += newton_schulz_flops(r, c, len(picked.table), batch)
    return total


@dataclass(frozen=True)
class Candidate:
    """One (backend, optimizer) pair and how to build it for a model's groups."""

    backend: str
    optimizer: str
    build: Callable[[nn.Module, list[dict[str, Any]], Recipe], Built]


def _scion(cls: type, backend: str) -> Callable[[nn.Module, list[dict[str, Any]], Recipe], Built]:
    def build(model: nn.Module, groups: list[dict[str, Any]], recipe: Recipe) -> Built:
        device = next(model.parameters()).device
        if backend in ("triton", "cuda") and device.type != "cuda":
            # On CPU the kernels only run emulated (Triton's interpreter, the test suite's host
            # emulation of the native module), which times nothing useful.
            raise Skip(f"the {backend} kernels are timed on CUDA devices only")
        try:
            opt = cls(groups, lr=recipe.lr, momentum=recipe.momentum, backend=backend)
        except ValueError as exc:  # e.g. the native module was not built
            raise Skip(str(exc)) from exc
        note = "average kept in p.grad" if cls is ScionLight else ""
        dtype = default_compute_dtype(device)  # the recipes leave ns_dtype unset
        return Built(opt.step, [opt.state], note, spectral_flops(groups), dtype)

    return build


def _reference(model: nn.Module, groups: list[dict[str, Any]], recipe: Recipe) -> Built:
    opt = PerParamReference(groups, lr=recipe.lr, momentum=recipe.momentum)
    device = next(model.parameters()).device
    note = "per-parameter loop, authors' scion.py restated"
    return Built(opt.step, [opt.state], note, spectral_flops(groups), default_compute_dtype(device))


def _adamw(params: list[Tensor], lr: float) -> tuple[torch.optim.AdamW, str]:
    """Fused AdamW over ``params``, or foreach AdamW when fused does not run here."""
    try:
        opt = torch.optim.AdamW(params, lr=lr, fused=True)
        opt.step()  # fused support is checked by the first step on some devices
        return opt, "fused"
    except (RuntimeError, ValueError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        return torch.optim.AdamW(params, lr=lr, foreach=True), f"foreach (fused: {first_line})"


def _adamw_all(model: nn.Module, groups: list[dict[str, Any]], recipe: Recipe) -> Built:
    params = [p for g in groups for p in g["params"]]
    opt, how = _adamw(params, 1e-3)
    return Built(opt.step, [opt.state], "" if how == "fused" else how)


def _spectral_params(groups: Sequence[Mapping[str, Any]]) -> list[Tensor]:
    """The parameters Scion orthogonalizes (Spectral, SpectralConv, or Auto on ≥ 2-D)."""
    out = []
    for g in groups:
        for p in g["params"]:
            if g["norm"] in ("Spectral", "SpectralConv") or (g["norm"] == "Auto" and p.ndim >= 2):
                out.append(p)
    return out


def _muon_adamw(model: nn.Module, groups: list[dict[str, Any]], recipe: Recipe) -> Built:
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise Skip(f"torch.optim.Muon is not in torch {torch.__version__}")
    spectral = _spectral_params(groups)
    matrices = [p for p in spectral if p.ndim == 2]
    if not matrices:
        raise Skip("Muon takes only 2-D matrices and this model's spectral weights are convs")
    ids = {id(p) for p in matrices}
    rest = [p for g in groups for p in g["params"] if id(p) not in ids]
    muon = muon_cls(matrices, lr=recipe.lr)
    adamw, how = _adamw(rest, 1e-3)

    def step() -> None:
        muon.step()
        adamw.step()

    convs = len(spectral) - len(matrices)
    note = f"Muon on {len(matrices)} matrices, AdamW ({how}) on {len(rest)} tensors"
    if convs:
        note += f" incl. {convs} conv weight(s)"
    flops = sum(newton_schulz_flops(*p.shape) for p in matrices)
    return Built(step, [muon.state, adamw.state], note, flops, torch.bfloat16)


def _to_lmo_norm(norm: str, kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Our norm name and options as pytorch_optimizer's ``(norm_type, norm_kwargs)``."""
    from pytorch_optimizer.optimizer.scion import LMONorm

    renames: dict[str, tuple[Any, dict[str, str]]] = {
        "Spectral": (LMONorm.SPECTRAL, {"max": "max_scale", "normalized": "normalize"}),
        "SpectralConv": (LMONorm.SPECTRALCONV, {}),
        "Sign": (LMONorm.SIGN, {"normalized": "normalize", "zero_init": "zero_init"}),
        "BiasRMS": (LMONorm.BIAS, {}),
        "Auto": (LMONorm.AUTO, {}),
        "ColNorm": (LMONorm.COL, {"normalized": "normalized", "transpose": "transpose"}),
        "RowNorm": (LMONorm.ROW, {"normalized": "normalized", "transpose": "transpose"}),
    }
    if norm not in renames:
        raise Skip(f"no pytorch_optimizer equivalent of norm {norm!r}")
    norm_type, names = renames[norm]
    out = {}
    for k, v in kwargs.items():
        if k == "steps" and norm in ("Spectral", "SpectralConv"):
            out["num_steps"] = v if v is not None else 5
        elif k in names:
            out[names[k]] = v
        else:
            raise Skip(f"no pytorch_optimizer equivalent of {norm} option {k}={v!r}")
    return norm_type, out


def _pytorch_optimizer_scion(
    model: nn.Module, groups: list[dict[str, Any]], recipe: Recipe
) -> Built:
    try:
        from pytorch_optimizer import SCION
    except ImportError as err:
        raise Skip(f"pytorch_optimizer is not importable ({err})") from err
    theirs = []
    for g in groups:
        norm_type, kwargs = _to_lmo_norm(g["norm"], g.get("norm_kwargs") or {})
        theirs.append(
            {
                "params": g["params"],
                "norm_type": norm_type,
                "norm_kwargs": kwargs,
                "scale": float(g["scale"]),
            }
        )
    opt = SCION(theirs, lr=recipe.lr, momentum=recipe.momentum, constraint=True)
    note = "constraint=True, default (foreach) path"
    return Built(opt.step, [opt.state], note, spectral_flops(groups), torch.bfloat16)


def candidates() -> list[Candidate]:
    """Every (backend, optimizer) pair measured on each model, ours first."""
    ours = []
    for backend in OUR_BACKENDS:
        ours.append(Candidate(backend, "Scion", _scion(scion_kernels.Scion, backend)))
        ours.append(Candidate(backend, "ScionLight", _scion(ScionLight, backend)))
    return [
        *ours,
        Candidate("pytorch_optimizer.SCION", "SCION", _pytorch_optimizer_scion),
        Candidate("reference_per_param", "Scion", _reference),
        Candidate("torch.optim.Muon", "Muon+AdamW", _muon_adamw),
        Candidate("adamw_fused", "AdamW", _adamw_all),
    ]


# ------------------------------------------------------------------------------ measurement
def _tensors(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def state_bytes(states: Iterable[Mapping[Any, Any]], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of every tensor storage held in ``states`` (each storage counted once), leaving
    out the storages of ``exclude`` (parameters and gradients are not optimizer state)."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0
    for state in states:
        for t in _tensors(list(state.values())):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen and ptr != 0:
                continue
            seen.add(ptr)
            total += storage.nbytes()
    return total


def _set_grads(params: Sequence[Tensor], pristine: Sequence[Tensor]) -> None:
    for p, g in zip(params, pristine, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _light_refresh(
    step: Callable[[], Any], grads: Sequence[Tensor], momentum: float, every: int = 16
) -> Callable[[], Any]:
    """``step`` for ScionLight, which multiplies ``p.grad`` by ``1 − α`` each call: every
    ``every`` calls the gradients are scaled back up, so repeated steps never reach
    denormals or zeros (a training loop's backward adds a fresh gradient instead)."""
    if momentum == 1.0:
        return step
    calls = 0
    restore = (1.0 - momentum) ** -every

    def fn() -> None:
        nonlocal calls
        step()
        calls += 1
        if calls % every == 0:
            torch._foreach_mul_(list(grads), restore)

    return fn


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class _Ready:
    """A built candidate during measurement."""

    cand: Candidate
    built: Built
    fn: Callable[[], Any]
    cuda_delta: int | None = None
    #: On CUDA: the peak of allocated memory during the first step, beyond what was allocated
    #: before the optimizer was built (parameters, gradients): state plus workspace.
    peak: int | None = None
    #: Seconds of the first step (JIT compilation, tables, state creation included).
    first_s: float | None = None
    single_ms: float | None = None  # set when its first call was too slow to repeat


def measure_model(ctx: Context, spec: ModelSpec) -> dict[tuple[str, str], float]:
    """Time every candidate's step on one model and record its rows; returns ms by
    ``(backend, optimizer)``.

    All candidates are built first (each with its own state, all on the same parameters),
    then timed in ``ROUNDS`` interleaved rounds; gradients are reset from one fixed random set
    before each timing call (outside the timed region).
    """
    torch.manual_seed(SEED)
    with ctx.device:
        model = spec.build().to(device=ctx.device, dtype=torch.float32)
    recipe = RECIPES[spec.recipe]
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    gen = torch.Generator(device=ctx.device).manual_seed(SEED)
    pristine = [
        torch.randn(p.shape, generator=gen, device=ctx.device, dtype=p.dtype) for p in params
    ]
    _set_grads(params, pristine)
    cuda = ctx.device.type == "cuda"
    ready: list[_Ready] = []
    for cand in candidates():
        groups = param_groups(model, spec.recipe)
        check_groups(spec.name, model, groups)
        _release(ctx.device)
        alloc0 = torch.cuda.memory_allocated(ctx.device) if cuda else 0
        what = f"step {spec.name:<13} {cand.backend:<23} {cand.optimizer:<10}"
        try:
            built = cand.build(model, groups, recipe)
        except Skip as why:
            ctx.log(f"{what} skipped: {why}")
            continue
        if built.dtype is not None:
            calls = 1 + ROUNDS * (1 if ctx.quick and not cuda else ctx.repeats)
            why = ctx.too_slow(built.flops, built.dtype, calls)
            if why:
                ctx.log(f"{what} skipped: {why}")
                continue
        fn = built.step
        if cand.optimizer == "ScionLight":
            fn = _light_refresh(fn, [p.grad for p in params], recipe.momentum)
        item = _Ready(cand, built, fn)
        if cuda:  # one step creates the state; the growth of live memory is its size
            torch.cuda.reset_peak_memory_stats(ctx.device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(ctx.device)
            item.first_s = time.perf_counter() - t0
            item.peak = torch.cuda.max_memory_allocated(ctx.device) - alloc0
            _release(ctx.device)
            item.cuda_delta = torch.cuda.memory_allocated(ctx.device) - alloc0
            _set_grads(params, pristine)
        ready.append(item)

    if not cuda:  # one first call each: a warm-up, and how long a call takes
        for item in ready:
            _set_grads(params, pristine)
            t0 = time.perf_counter()
            item.fn()
            seconds = time.perf_counter() - t0
            if seconds > SLOW_CALL_S:
                item.single_ms = 1e3 * seconds
                ctx.log(f"step {spec.name:<13} {item.cand.backend:<23} {seconds:.0f} s per call")
    times: dict[int, list[float]] = {
        i: [item.single_ms] if item.single_ms else [] for i, item in enumerate(ready)
    }
    repeats = 1 if ctx.quick and not cuda else None
    for r in range(ROUNDS):
        order = range(len(ready)) if r % 2 == 0 else reversed(range(len(ready)))
        for i in order:
            if ready[i].single_ms is None:
                _set_grads(params, pristine)
                times[i].append(ctx.time_ms(ready[i].fn, repeats=repeats, warmup=cuda))

    exclude = params + [p.grad for p in params if p.grad is not None]
    results: dict[tuple[str, str], float] = {}
    for i, item in enumerate(ready):
        cand, ms = item.cand, statistics.median(times[i])
        nbytes = state_bytes(item.built.states, exclude)
        notes = [n for n in (spec.note, item.built.note) if n]
        if item.single_ms is not None:
            notes.append(f"one call (the first: over {SLOW_CALL_S:.0f} s, not repeated)")
        else:
            rounds = f"{min(times[i]):.4g}–{max(times[i]):.4g} ms"
            notes.append(f"median of {ROUNDS} interleaved rounds ({rounds})")
        if item.cuda_delta is not None:
            notes.append(f"cuda memory_allocated +{item.cuda_delta / 2**20:.1f} MiB")
        note = "; ".join(notes)
        rates: dict[str, Any] = {}
        if item.built.dtype is not None:
            tflops = item.built.flops / (ms * 1e-3) / 1e12
            rate = ctx.matrix_rate(item.built.dtype)
            rates = {"tflops": tflops, "ceiling_fraction": tflops / rate}
            rates["dtype"] = str(item.built.dtype).removeprefix("torch.")
        ctx.add(
            bench="step",
            backend=cand.backend,
            model=spec.name,
            optimizer=cand.optimizer,
            ms=ms,
            state_bytes=nbytes,
            **({"peak_bytes": item.peak} if item.peak is not None else {}),
            **({"first_s": item.first_s} if item.first_s is not None else {}),
            numel=numel,
            **rates,
            note=note,
        )
        rate_note = ""
        if rates:
            rate_note = f"  {rates['tflops']:.3g} TFLOP/s ({rates['ceiling_fraction']:.0%} of "
            rate_note += f"{rates['dtype']})"
        ctx.log(
            f"step {spec.name:<13} {cand.backend:<23} {cand.optimizer:<10} {ms:10.2f} ms "
            f"(rounds {min(times[i]):.4g}–{max(times[i]):.4g})  state {nbytes / 2**20:7.1f} MiB"
            + rate_note
            + (f"  [{item.built.note}]" if item.built.note else "")
        )
        results[(cand.backend, cand.optimizer)] = ms
    for p in params:
        p.grad = None
    del ready, model, params, pristine
    _release(ctx.device)
    return results


def run(ctx: Context) -> None:
    """Measure one whole optimizer step on each model for every candidate; record "step"
    rows and log each measurement, then the ratio of our Scion to pytorch_optimizer's SCION."""
    for spec in model_specs(ctx):
        results = measure_model(ctx, spec)
        peer = results.get(("pytorch_optimizer.SCION", "SCION"))
        ref = results.get(("reference_per_param", "Scion"))
        for backend in OUR_BACKENDS:
            ours = results.get((backend, "Scion"))
            if ours is None:
                continue
            parts = []
            if peer:
                parts.append(f"/ pytorch_optimizer.SCION = {ours / peer:.2f}")
            if ref:
                parts.append(f"/ reference_per_param = {ours / ref:.2f}")
            if parts:
                ctx.log(f"step {spec.name:<13} Scion ({backend}) " + ", ".join(parts))
