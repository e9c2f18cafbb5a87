"""Parameter groups by role, with recipes for stock models and the authors' recipes as presets.

Every parameter of a model gets one of four roles:

- ``input``: the embeddings (every ``nn.Embedding``/``nn.EmbeddingBag`` weight) or, in a model
  without embeddings, the first Linear/Conv to run (a ViT's patch embedding);
- ``head``: every output layer — each layer whose output is a model output, found by running
  the model once (:func:`scion_kernels.layers.output_layers`), several heads and tied ones
  included; name them with ``head=`` otherwise. A head weight tied to an embedding is counted
  once: as the head in the authors' recipes, as the embedding (``input``) in the stock ones
  (:attr:`Recipe.tied`). Where the run shows the tied head reading its input rescaled by a
  constant ``c`` (T5 multiplies by ``d_model^-½``; more than √2 away from 1, within 2^±8),
  that matrix's radius is divided by ``c``;
- ``hidden``: every other matrix, conv or stacked-experts weight;
- ``vector``: biases, norm gains, layer scales, and broadcast parameters such as a ViT's
  position embedding and class token (any shape: BiasRMS reduces over all elements);
- ``free``: parameters with a meaning of their own, whose value the model reads as such
  (:func:`scion_kernels.layers.free_layout`): attention bias tables (Swin's
  ``relative_position_bias_table``, T5's ``relative_attention_bias``), state-space parameters
  (Mamba's ``A_log``, ``D``, time-step biases), temperatures (CLIP's ``logit_scale``) and any
  scalar. They take an unconstrained element-wise step (``unconstrained=True`` in their group:
  the constrained step's ``(1 − γ)·x`` would pull ``A_log`` or a temperature towards zero)
  and ``init()`` leaves them as the model made them.

Each parameter's kind and storage come from its module's type
(:func:`scion_kernels.layers.describe`), and its norm gets the options that make it read the
layer's true ``(d_out, d_in)``: HF GPT-2's ``Conv1D`` and embeddings are stored transposed,
MoE experts are stacked, grouped and depthwise convs take one LMO per group. The stock recipes
orthogonalize convs whose windows overlap (stride < kernel) per kernel tap
(``SpectralConv(per_tap=True)``, :attr:`Recipe.per_tap`) and give conv weights their own
radius (:attr:`Role.conv_scale`: SpectralConv divides by the kernel size).

What ``Scion.init()`` then does, per role: ``input``/``hidden`` weights go on the sphere of
radius ρ of their norm (orthogonal for Spectral, per tap for SpectralConv, normalized columns
for ColNorm, ±1 for unnormalized Sign); an untied Sign ``head`` is zeroed (logits start at 0);
biases are zeroed; everything else is left as the model made it (``init: False`` in its group):
norm gains and layer scales, position embeddings and class tokens, ``free`` parameters, a head
tied to an embedding, and every embedding of a model with such a head.

A :class:`Recipe` maps each role to a norm, its options and a radius ρ, and suggests a learning
rate and momentum. A role may step at a multiple of the learning rate (:attr:`Role.lr_scale`,
the group's ``lr_scale``): the stock recipes do so in a model whose head is tied to its
embedding (:attr:`Recipe.tied_lr_scale`: hidden matrices ×2; the shared matrix, vectors and
``free`` parameters ×½). ``"stock"`` (language models), ``"stock-vit"`` and ``"stock-cnn"`` are for
models as their libraries build them;
``"gpt"``, ``"mlp"``, ``"cnn"`` and ``"vit"`` are the authors' (``LIONS-EPFL/scion``), tuned on
their modified models (weightless norms, scaled activations).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import backends
from .layers import (
    Layout,
    describe,
    example_inputs_for,
    layer_modules,
    run_layers,
    warn_guessed,
    weight_layout,
)
from .norms import NORMS, Norm, _accepted_options, describe_misfit, make_norm

__all__ = ["RECIPES", "Recipe", "Role", "format_groups", "param_groups"]

ROLES = ("input", "hidden", "head", "vector", "free")


@dataclass(frozen=True)
class Role:
    """The norm, its options and the radius ρ that one role gets."""

    norm: str
    scale: float
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: The radius of the role's conv weights with a kernel of more than one element
    #: (SpectralConv divides its LMO by the kernel size K); ``None``: ``scale``. A 1×1 conv is
    #: a matrix and takes ``scale``.
    conv_scale: float | None = None
    #: Step the role's parameters with ``x ← x − γ·ρ·lmo`` (no shrink towards the origin):
    #: their groups get ``unconstrained=True``.
    unconstrained: bool = False
    #: The role's learning rate as a multiple of the optimizer's: its groups get
    #: ``lr_scale`` and step with ``γ·lr_scale`` (the step and the shrink alike).
    lr_scale: float = 1.0

    def scale_of(self, norm: str, shape: Sequence[int]) -> float:
        """The radius of a parameter of ``shape`` in this role whose norm is ``norm``."""
        if norm == "SpectralConv" and math.prod(shape[2:]) > 1 and self.conv_scale is not None:
            return self.conv_scale
        return self.scale


@dataclass(frozen=True)
class Recipe:
    """A norm and radius per role, plus the learning rate and momentum the authors used."""

    input: Role
    hidden: Role
    head: Role
    vector: Role
    lr: float
    momentum: float
    source: str = ""
    #: The role of a head weight tied to an embedding: ``"head"`` (the authors' tied nanoGPT)
    #: or ``"input"`` (the embedding's norm and radius; the stock recipes).
    tied: str = "head"
    #: Convs whose windows overlap (stride < kernel) get ``SpectralConv(per_tap=True)``, one
    #: polar factor per kernel tap (the stock recipes); ``False``: one for the flattened kernel,
    #: as the authors' code. Patchify convs (stride = kernel) are always one matrix.
    per_tap: bool = False
    #: Parameters with a meaning of their own (attention bias tables, state-space parameters,
    #: temperatures, scalars): an unconstrained element-wise step, since pulling them towards
    #: zero (the constrained step's ``(1 − γ)·x``) changes what they mean.
    free: Role = Role("BiasRMS", 0.1, unconstrained=True)
    #: Per role, its ``lr_scale`` in a model whose head is tied to its embedding (the stock
    #: recipes: hidden matrices ×2, the shared matrix, vectors and free parameters ×½).
    tied_lr_scale: Mapping[str, float] = field(default_factory=dict)


def _auto_everywhere(scale: float, head: float, **options: Any) -> Recipe:
    """Auto at radius ``scale`` on every role but the head (Sign at ``head``)."""
    return Recipe(
        Role("Auto", scale),
        Role("Auto", scale),
        Role("Sign", head),
        Role("BiasRMS", scale),
        **options,
    )


# Language transformers (GPT-2, Llama, BERT, MoE, Gemma, Mamba, T5, Whisper, CLIP): embeddings
# ρ = 1, hidden ρ = 2, vectors ρ = 0.1 (biases and gains; a larger radius lets the constrained
# step swing them), head Sign ρ = 32. Auto resolves per layer: ColNorm(transpose) on
# embeddings, Spectral on matrices. lr 2⁻⁷: the best of 2⁻³…2⁻⁹ without init() on 7 of these 8
# families (Whisper: 2⁻⁶), bench/NOTES.md. With a tied head the hidden matrices learn at 2γ
# and the shared matrix, vectors and free parameters at γ/2: tied Llama 2.216 → 2.097, Mamba
# 2.126 → 2.047, T5 2.473 → 2.048 (bench/NOTES.md, "Real models IV").
_STOCK = Recipe(
    input=Role("Auto", 1.0),
    hidden=Role("Auto", 2.0),
    head=Role("Sign", 32.0),
    vector=Role("BiasRMS", 0.1),
    lr=2**-7,
    momentum=0.1,
    source="bench/recipes.py sweeps on stock GPT-2, Llama and the real-models-II families",
    tied="input",
    per_tap=True,
    tied_lr_scale={"hidden": 2.0, "input": 0.5, "vector": 0.5, "free": 0.5},
)

#: Recipes for stock models (HF transformers, timm, torchvision as their libraries build them:
#: norm layers with gains, GELU or ReLU unscaled), from a learning-rate/radius sweep on small
#: stock models (``python -m bench.recipes``, bench/NOTES.md), and the authors' recipes.
#: ``lr`` and ``momentum`` are suggestions for ``Scion(groups, lr=..., momentum=...)``; the
#: groups themselves carry only the norm, its options and the radius.
# fmt: off
RECIPES: dict[str, Recipe] = {
    "stock": _STOCK,
    # Vision transformers (ViT, DeiT): as "stock", with the patch embedding (SpectralConv,
    # divided by the patch area) at ρ = 2.
    "stock-vit": replace(
        _STOCK, input=Role("Auto", 2.0), lr=2**-6, source="bench/recipes.py sweep on stock ViT"
    ),
    # Conv nets with BatchNorm or LayerNorm (ResNet, ConvNeXt): matrices (ConvNeXt's MLPs)
    # ρ = 2 as in "stock"; conv weights ρ = 128 (SpectralConv divides by the kernel size K),
    # one polar factor per tap where windows overlap; vectors ρ = 0.3 (BatchNorm gains that
    # start at 0 in a residual branch must grow).
    "stock-cnn": replace(
        _STOCK,
        input=Role("Auto", 2.0, conv_scale=128.0),
        hidden=Role("Auto", 2.0, conv_scale=128.0),
        vector=Role("BiasRMS", 0.3),
        lr=2**-6,
        source="bench/recipes.py sweep on stock ResNet and ConvNeXt",
    ),
    # nanoGPT (README, examples/modded-nanogpt): Spectral ρ=50 on the blocks, Sign ρ=50·60 on the
    # head; an untied embedding gets Sign(normalized=False) ρ=1 as in examples/shallow-nanogpt.
    "gpt": Recipe(
        Role("Sign", 1.0, {"normalized": False}), Role("Spectral", 50.0), Role("Sign", 3000.0),
        Role("BiasRMS", 50.0), lr=2**-12, momentum=0.1,
        source="README nanoGPT; examples/modded-nanogpt, examples/shallow-nanogpt",
    ),
    # MLP (README): Spectral(max=True) on the input layer, Spectral on hidden, Sign ρ=2¹⁰ head.
    "mlp": Recipe(
        Role("Spectral", 1.0, {"max": True}), Role("Spectral", 1.0), Role("Sign", 2.0**10),
        Role("BiasRMS", 1.0), lr=2**-6, momentum=0.1, source="README MLP",
    ),
    # CNN (README, examples/airbench): Auto ρ=8 everywhere but the head, Sign ρ=8·16.
    "cnn": _auto_everywhere(8.0, 128.0, lr=2**-4, momentum=0.5,
                            source="README CNN; examples/airbench"),
    # DeiT (examples/deit): Auto ρ=25, head Sign ρ=500, BiasRMS ρ=25 on pos_embed and cls_token.
    "vit": _auto_everywhere(25.0, 500.0, lr=8e-5, momentum=0.1, source="examples/deit"),
}
# fmt: on

_SPECTRAL_ONLY = ("max", "normalized", "batch_dims", "split")
_AUTO_BY_KIND = {"matrix": "Spectral", "embedding": "ColNorm", "conv": "SpectralConv"}


def _fit_role(role: Role, layout: Layout, per_tap: bool) -> tuple[str, dict[str, Any]]:
    """The role's norm and options for a parameter of ``layout``: ``Auto`` resolved by kind,
    Spectral turned into SpectralConv for conv weights, the layout's options (``transpose``,
    ``batch_dims``, ``split``, ``groups``) added where the norm takes them, and ``per_tap``
    for a SpectralConv whose windows overlap (unless the role sets it)."""
    name, kwargs = role.norm, dict(role.norm_kwargs)
    if name == "Auto":
        make_norm("Auto", kwargs)  # an option no norm Auto picks accepts raises here
        name = _AUTO_BY_KIND.get(layout.kind, "BiasRMS")
        kwargs = {k: v for k, v in kwargs.items() if k in _accepted_options(NORMS[name])}
    if name == "Spectral" and layout.kind == "conv":
        name = "SpectralConv"
        kwargs = {k: v for k, v in kwargs.items() if k not in _SPECTRAL_ONLY}
    accepted = _accepted_options(NORMS[name])
    kwargs.update({k: v for k, v in layout.options.items() if k in accepted})
    if name == "SpectralConv" and per_tap and layout.overlaps:
        kwargs.setdefault("per_tap", True)
    return name, kwargs


def _as_names(names: str | Iterable[str] | None) -> set[str] | None:
    if names is None:
        return None
    return {names} if isinstance(names, str) else set(names)


def _named_heads(model: nn.Module, layers: Mapping[str, nn.Module]) -> set[str]:
    """The output layers HF (``get_output_embeddings``) and timm (``get_classifier``) models
    name."""
    by_id = {id(m): n for n, m in layers.items()}
    found: set[str] = set()
    for method in ("get_output_embeddings", "get_classifier"):
        try:
            got = getattr(model, method)() if callable(getattr(model, method, None)) else None
        except Exception:  # noqa: BLE001 - a model's own helper may not apply to it
            got = None
        for m in got if isinstance(got, (tuple, list)) else [got]:
            if isinstance(m, nn.Module) and id(m) in by_id:
                found.add(by_id[id(m)])
    return found


def _fallback_heads(model: nn.Module, layers: Mapping[str, nn.Module]) -> set[str]:
    """Output layers without running the model: :func:`_named_heads`, else the last layer
    registered."""
    found = _named_heads(model, layers)
    if not found:
        matrices = [n for n, m in layers.items() if not isinstance(m, _EMBEDDINGS)]
        found = set(matrices[-1:])
    return found


def _guess_words(
    model: nn.Module, layers: Mapping[str, nn.Module], head_names: set[str] | None
) -> str:
    heads = sorted(head_names if head_names is not None else _fallback_heads(model, layers))
    return f"the head is {heads}" + ("" if head_names is not None else " (guessed)")


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _param_name(model: nn.Module, w: torch.Tensor) -> str:
    """The ``named_parameters`` name of ``w`` (tied tensors have one)."""
    return next(n for n, p in model.named_parameters() if p is w)


def param_groups(
    model: nn.Module,
    recipe: str | Recipe = "stock",
    *,
    head: str | Iterable[str] | None = None,
    input: str | Iterable[str] | None = None,  # noqa: A002 - the role's name
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    roles: Mapping[str, str] | None = None,
    example_inputs: Any = None,
    split_fused: bool = False,
) -> list[dict[str, Any]]:
    """Build Scion parameter groups for ``model`` by role (see the module docstring).

    Each parameter's kind and storage come from its module's type
    (:func:`scion_kernels.layers.describe`); its norm gets the options that make it read the
    true ``(d_out, d_in)`` (``transpose``, ``batch_dims``, ``split``, ``groups``). A parameter
    of 2+ dims that no rule knows is grouped as a matrix with a warning naming it.

    Args:
        model: the model; only parameters with ``requires_grad`` are included, tied ones once.
        recipe: a name from :data:`RECIPES` (default ``"stock"``) or a :class:`Recipe`.
        head: module name(s) whose weight is an output head. Default: every layer whose output
            is a model output, found by running ``model`` once on ``example_inputs``
            (:func:`scion_kernels.layers.output_layers`); without inputs, what HF
            (``get_output_embeddings``) or timm (``get_classifier``) models name, else the last
            Linear/Conv registered.
        input: module name(s) whose weight is the input layer (default: every embedding, else
            the first Linear/Conv to run, or registered).
        overrides: per role, fields of :class:`Role` to replace, e.g.
            ``{"head": {"scale": 1000.0}}``.
        roles: per parameter name, its role (``"input"``, ``"hidden"``, ``"head"``,
            ``"vector"``, ``"free"``), overriding everything above.
        example_inputs: what ``model`` is called with once to find its heads: a tensor, a tuple
            of positional inputs, or a dict of keyword inputs. Default: derived for HF
            transformers and timm models (:func:`scion_kernels.layers.example_inputs_for`);
            ``False``: never run the model.
        split_fused: orthogonalize the blocks of fused projections on their own
            (``nn.MultiheadAttention``'s Q, K, V; RNN gates). Default off (one matrix).

    Returns:
        A list of group dicts (``params``, ``param_names``, ``norm``, ``norm_kwargs``, ``scale``,
        ``role``; ``lr_scale`` where a role steps at a multiple of the learning rate;
        ``init: False`` where ``Scion.init()`` leaves the parameters as the model made them:
        vectors other than biases, ``free`` parameters, a head tied to an embedding, and
        every embedding of a model with such a head; ``unconstrained: True`` where the role
        steps without the constraint, ``free`` in every recipe) for
        :class:`~scion_kernels.Scion`, one per (role, norm, options, radius, init, step, lr);
        empty roles are left out. An untied ``Sign`` head gets
        ``zero_init=True``: ``init()`` zeroes it and the logits start at 0.
        :func:`format_groups` prints which parameter got what.
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    for r, fields in (overrides or {}).items():
        if r not in ROLES:
            raise ValueError(f"unknown role {r!r} in overrides; roles are {ROLES}")
        replace(getattr(recipe, r), **fields)  # unknown fields raise here, before any run

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    head_names, input_names = _as_names(head), _as_names(input)
    for names, what in ((head_names, "head"), (input_names, "input")):
        missing = sorted((names or set()) - set(modules))
        if missing:
            raise ValueError(f"{what}: no module named {missing} in the model")
    for name, role in (roles or {}).items():
        if name not in params:
            raise ValueError(f"roles: no parameter named {name!r} in the model")
        if role not in ROLES:
            raise ValueError(f"roles: unknown role {role!r} for {name!r}; roles are {ROLES}")
    for name in head_names or ():
        if not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise ValueError(f"head: module {name!r} has no weight tensor")

    layouts = describe(model, split_fused=split_fused)
    warn_guessed({n: lay for n, lay in layouts.items() if n not in (roles or {})})
    layer_kinds = ("matrix", "conv", "embedding")
    layers = layer_modules(model)
    order = list(layers)
    fed: set[str] = set()  # layers that took a model input itself
    run = None
    if head_names is None or input_names is None:
        inputs = example_inputs_for(model) if example_inputs is None else example_inputs
        if inputs is not None and inputs is not False:
            try:
                run = run_layers(model, layers, inputs)
            except Exception as e:  # noqa: BLE001 - any failure of the model's own forward
                what = "output layers" if head_names is None else "input layers"
                warnings.warn(
                    f"could not run the model to find its {what} ({type(e).__name__}: {e}); "
                    f"{_guess_words(model, layers, head_names)}. Pass example_inputs= or "
                    "head=/input=",
                    UserWarning,
                    stacklevel=2,
                )
        elif (
            head_names is None
            and getattr(model, "config", None) is not None
            and not _named_heads(model, layers)
        ):
            # A library model (it has a config) that names no head and whose inputs could not
            # be derived: the last layer registered is a guess (a plain module's is documented).
            warnings.warn(
                "the model was not run (no example inputs derived from its config), so its "
                f"output layer is a guess: {_guess_words(model, layers, None)}. Pass "
                "example_inputs= or head=",
                UserWarning,
                stacklevel=2,
            )
        if run is not None:
            if head_names is None:
                # No head but normalized outputs (CLIP): every output is scale-free, so the
                # model has no head; none at all (a backbone): the layer it names, or its last.
                head_names = set(run.heads)
                if not head_names and not run.normalized:
                    head_names = _fallback_heads(model, layers)
            order = run.order + [n for n in order if n not in run.order]
            fed = set(run.fed)
        elif head_names is None:
            head_names = _fallback_heads(model, layers)
    assert head_names is not None
    if input_names is None:
        # Every embedding, and every layer that read a model input itself (a ViT's patch
        # embedding, Whisper's first conv, CLIP's image tower beside its token embedding);
        # else the first layer to run.
        embeddings = {n for n, m in layers.items() if isinstance(m, _EMBEDDINGS)}
        input_names = (embeddings | fed) - head_names
        if not input_names:
            input_names = set([n for n in order if n not in head_names][:1])

    role_of: dict[int, str] = {}
    for name, m in layers.items():
        w = m.weight
        if name in head_names:
            role_of[id(w)] = "head"  # a tied head weight is the head, whoever else holds it
            layouts[_param_name(model, w)] = replace(weight_layout(m), module=name)
        elif id(w) not in role_of:
            role_of[id(w)] = "input" if name in input_names else "hidden"
    # Embedding weights a head also holds (a head tied to the token embedding). Embeddings
    # shared only with other embeddings (T5's encoder and decoder without a tied head) are not.
    head_weights = {id(layers[n].weight) for n in head_names if n in layers}
    tied_ids = {
        id(m.weight)
        for m in layers.values()
        if isinstance(m, _EMBEDDINGS) and id(m.weight) in head_weights
    }
    by_role = {r: getattr(recipe, r) for r in ROLES}
    if tied_ids:
        for r, k in recipe.tied_lr_scale.items():
            by_role[r] = replace(by_role[r], lr_scale=k)
    for r, fields in (overrides or {}).items():
        by_role[r] = replace(by_role[r], **fields)
    # A tied head that reads its input rescaled by a constant (T5: the final norm's output
    # times d_model^-½) would give logits that much smaller than the radius of the matrix it
    # shares says: that matrix's radius is divided by the RMS the head read in the run. Only
    # a clear rescale counts (more than √2 away from 1; a norm's output reads 1), and only
    # within 2^±8: past that the input is no rescaled norm output (zeros at init, say).
    read_rms: dict[int, float] = {}
    for n in sorted(head_names & set(run.input_rms) if run is not None else ()):
        c = run.input_rms[n]
        if n not in layers or id(layers[n].weight) not in tied_ids:
            continue
        if not (math.isfinite(c) and 2.0**-8 <= c <= 2.0**8):
            warnings.warn(
                f"the tied head {n!r} read an input of RMS {c:.3g} in the example run; its "
                "radius is left as the recipe gives it. Set it with overrides= if the logits' "
                "scale needs it",
                UserWarning,
                stacklevel=2,
            )
        elif abs(math.log2(c)) > 0.5:
            read_rms[id(layers[n].weight)] = c
    if recipe.tied == "input":  # a tied head is an embedding too: it keeps the input role
        for name, m in layers.items():
            if id(m.weight) in tied_ids and isinstance(m, _EMBEDDINGS):
                role_of[id(m.weight)] = "input"
                layouts[_param_name(model, m.weight)] = replace(weight_layout(m), module=name)

    groups: dict[tuple, dict[str, Any]] = {}
    for pname, p in params.items():  # named_parameters() yields tied tensors once
        if not p.requires_grad:
            continue
        lay = layouts[pname]
        if lay.kind == "free":
            default = "free"
        else:
            default = role_of.get(id(p), "hidden" if lay.kind in layer_kinds else "vector")
        role = (roles or {}).get(pname) or default
        if role in ("input", "hidden", "head") and lay.kind not in layer_kinds:
            lay = Layout("matrix", lay.module, lay.rule)
        norm, kwargs = _fit_role(by_role[role], lay, recipe.per_tap)
        misfit = describe_misfit(make_norm(norm, kwargs), p.shape, f"{pname!r} ({lay.rule})")
        if misfit:
            raise ValueError(
                f"the {role} role's norm does not fit: {misfit}. Change the role's norm with "
                f"overrides={{{role!r}: {{'norm': ...}}}}"
            )
        tied = id(p) in tied_ids
        if role == "head" and norm == "Sign" and not tied:
            kwargs.setdefault("zero_init", True)  # logits start at 0, as the authors' nanoGPT
        keep = (
            (role == "vector" and lay.kind != "bias")
            or role == "free"
            or tied
            or (lay.kind == "embedding" and bool(tied_ids))  # summed with the tied one
        )
        scale = by_role[role].scale_of(norm, p.shape)
        if id(p) in read_rms:
            scale = float(f"{scale / read_rms[id(p)]:.3g}")
        unconstrained = by_role[role].unconstrained
        lr_scale = float(by_role[role].lr_scale)
        key = (role, norm, repr(sorted(kwargs.items())), scale, keep, unconstrained, lr_scale)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "param_names": [],
                "norm": norm,
                "norm_kwargs": kwargs,
                "scale": scale,
                "role": role,
                **({"init": False} if keep else {}),
                **({"unconstrained": True} if unconstrained else {}),
                **({"lr_scale": lr_scale} if lr_scale != 1.0 else {}),
            },
        )
        group["params"].append(p)
        group["param_names"].append(pname)
    rank = {r: i for i, r in enumerate(ROLES)}
    return sorted(groups.values(), key=lambda g: rank[g["role"]])


def format_groups(groups: Iterable[Mapping[str, Any]]) -> str:
    """A readable table: each parameter, its shape, role, norm (with options), radius, its
    learning rate as a multiple of the optimizer's (``lr_scale``), what
    ``Scion.init()`` does to it (``norm``: a point of radius ρ of its norm; ``kept``: left as
    the model made it), the dtype its Newton–Schulz computes in on the parameter's device
    (``(auto)``: chosen for the hardware, see
    :func:`scion_kernels.newton_schulz.default_compute_dtype`), and the backend that steps it
    (the group's ``backend``, ``"auto"`` if it has none; where that backend does not take the
    parameter, the reference ``torch`` and why; where it cannot run on the parameters' device,
    the reason in a line below the table). An unknown backend name raises ``ValueError``."""
    rows = [("parameter", "shape", "role", "norm", "radius", "lr", "init", "Newton–Schulz",
             "backend")]  # fmt: skip
    notes: list[str] = []
    for gi, g in enumerate(groups):
        names = g.get("param_names") or [f"group{gi}[{i}]" for i in range(len(g["params"]))]
        given = g.get("norm", "Auto")
        kw = g.get("norm_kwargs") or {}
        if isinstance(given, Norm):
            given, kw = given.spec()
        norm_obj = make_norm(given, kw)
        norm = given + ("(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")" if kw else "")
        init = "norm" if g.get("init", True) else "kept"
        lr = f"×{float(g.get('lr_scale', 1.0)):g}"
        option = g.get("backend", "auto")
        if option != "auto":
            backends.get(option)  # an unknown name is an error, not a fallback
        plain = {"params": list(g["params"]), "norm": given, "norm_kwargs": kw,
                 "buffer_dtype": g.get("buffer_dtype")}  # fmt: skip
        try:
            route = backends.route({**plain, "backend": option}, f"group {gi}", norm_obj)
            unavailable = ""
        except ValueError as err:
            route = backends.route({**plain, "backend": "torch"}, f"group {gi}", norm_obj)
            unavailable = f" ({option} cannot run here)"
            notes.append(str(err))
        for i, (name, p) in enumerate(zip(names, g["params"], strict=True)):
            shape = "×".join(str(s) for s in p.shape) or "scalar"
            role = str(g.get("role", ""))
            rows.append((name, shape, role, norm, f"{g.get('scale', '')}", lr, init,
                         route.newton_schulz(i), route.describe(i) + unavailable))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [f"({note})" for note in dict.fromkeys(notes)])
