"""Parameter groups by role, with the authors' recipes as presets.

Every parameter of a model gets one of four roles:

- ``input``: the token embedding (every ``nn.Embedding`` weight) or, in a model without
  embeddings, the weight of the first ``nn.Linear``/``nn.ConvNd``;
- ``head``: the weight of the output layer (by default the last ``nn.Linear``/``nn.ConvNd``
  registered; name it with ``head=`` otherwise). A head weight tied to an embedding is counted
  once, as the head, as in the authors' tied nanoGPT;
- ``hidden``: every other ``nn.Linear``/``nn.ConvNd`` weight;
- ``vector``: everything else — biases, norm gains, and free parameters such as a ViT's
  position embedding and class token (any shape: BiasRMS reduces over all elements).

A :class:`Recipe` maps each role to a norm, its options and a radius ρ, and suggests a learning
rate and momentum. The presets come from the authors' README and examples (``LIONS-EPFL/scion``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .norms import Norm, Spectral, make_norm

__all__ = ["RECIPES", "Recipe", "Role", "format_groups", "param_groups"]

ROLES = ("input", "hidden", "head", "vector")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Role:
    """The norm, its options and the radius ρ that one role gets."""

    norm: str
    scale: float
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)


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


#: The authors' recipes. ``lr`` and ``momentum`` are suggestions for ``Scion(groups, lr=...,
#: momentum=...)``; the groups themselves carry only the norm, its options and the radius.
RECIPES: dict[str, Recipe] = {
    # nanoGPT (README, examples/modded-nanogpt): Spectral ρ=50 on the blocks, Sign ρ=50·60 on the
    # head; an untied embedding gets Sign(normalized=False) ρ=1 as in examples/shallow-nanogpt.
    "gpt": Recipe(
        input=Role("Sign", 1.0, {"normalized": False}),
        hidden=Role("Spectral", 50.0),
        head=Role("Sign", 3000.0),
        vector=Role("BiasRMS", 50.0),
        lr=2**-12,
        momentum=0.1,
        source="README nanoGPT; examples/modded-nanogpt, examples/shallow-nanogpt",
    ),
    # MLP (README): Spectral(max=True) on the input layer, Spectral on hidden, Sign ρ=2¹⁰ head.
    "mlp": Recipe(
        input=Role("Spectral", 1.0, {"max": True}),
        hidden=Role("Spectral", 1.0),
        head=Role("Sign", 2.0**10),
        vector=Role("BiasRMS", 1.0),
        lr=2**-6,
        momentum=0.1,
        source="README MLP",
    ),
    # CNN (README, examples/airbench): Auto ρ=8 everywhere but the head, Sign ρ=8·16.
    "cnn": Recipe(
        input=Role("Auto", 8.0),
        hidden=Role("Auto", 8.0),
        head=Role("Sign", 128.0),
        vector=Role("BiasRMS", 8.0),
        lr=2**-4,
        momentum=0.5,
        source="README CNN; examples/airbench",
    ),
    # DeiT (examples/deit): Auto ρ=25, head Sign ρ=500, BiasRMS ρ=25 on pos_embed and cls_token.
    "vit": Recipe(
        input=Role("Auto", 25.0),
        hidden=Role("Auto", 25.0),
        head=Role("Sign", 500.0),
        vector=Role("BiasRMS", 25.0),
        lr=8e-5,
        momentum=0.1,
        source="examples/deit",
    ),
}

_SPECTRAL_ONLY = ("max", "normalized", "batch_dims")


def _fit_role(role: Role, ndim: int) -> tuple[str, dict[str, Any]]:
    """The role's norm, with a Spectral role turned into SpectralConv for conv weights."""
    kwargs = dict(role.norm_kwargs)
    if role.norm == "Spectral" and ndim >= 3:
        return "SpectralConv", {k: v for k, v in kwargs.items() if k not in _SPECTRAL_ONLY}
    return role.norm, kwargs


def _as_names(names: str | Iterable[str] | None) -> set[str] | None:
    if names is None:
        return None
    return {names} if isinstance(names, str) else set(names)


def param_groups(
    model: nn.Module,
    recipe: str | Recipe = "gpt",
    *,
    head: str | Iterable[str] | None = None,
    input: str | Iterable[str] | None = None,  # noqa: A002 - the role's name
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Build Scion parameter groups for ``model`` by role (see the module docstring).

    Args:
        model: the model; only parameters with ``requires_grad`` are included, tied ones once.
        recipe: a name from :data:`RECIPES` (``"gpt"``, ``"mlp"``, ``"cnn"``, ``"vit"``) or a
            :class:`Recipe`.
        head: module name(s) whose weight is the output head (default: the last Linear/Conv).
        input: module name(s) whose weight is the input layer (default: every Embedding, else
            the first Linear/Conv).
        overrides: per role, fields of :class:`Role` to replace, e.g.
            ``{"head": {"scale": 1000.0}}``.

    Returns:
        A list of group dicts (``params``, ``param_names``, ``norm``, ``norm_kwargs``, ``scale``)
        for :class:`~scion_kernels.Scion`, one per (role, norm, options, radius); empty roles are
        left out. ``format_groups`` prints which parameter got what.
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    roles = {r: getattr(recipe, r) for r in ROLES}
    for r, fields in (overrides or {}).items():
        if r not in roles:
            raise ValueError(f"unknown role {r!r} in overrides; roles are {ROLES}")
        roles[r] = replace(roles[r], **fields)

    modules = dict(model.named_modules())
    head_names, input_names = _as_names(head), _as_names(input)
    for names, what in ((head_names, "head"), (input_names, "input")):
        missing = sorted((names or set()) - set(modules))
        if missing:
            raise ValueError(f"{what}: no module named {missing} in the model")
    layers = [n for n, m in modules.items() if isinstance(m, _LAYERS)]
    embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
    if head_names is None:
        head_names = {layers[-1]} if layers else set()
    if input_names is None:
        if embeddings:
            input_names = set(embeddings)
        else:
            first = [n for n in layers if n not in head_names][:1]
            input_names = set(first)

    role_of: dict[int, str] = {}
    for name, m in modules.items():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or not isinstance(m, (*_LAYERS, nn.Embedding)):
            continue
        if name in head_names:
            role_of[id(w)] = "head"  # a tied head weight is the head, whoever else holds it
        elif id(w) not in role_of:
            role_of[id(w)] = "input" if name in input_names else "hidden"
    for name in head_names:
        if not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise ValueError(f"head: module {name!r} has no weight tensor")

    groups: dict[tuple, dict[str, Any]] = {}
    for pname, p in model.named_parameters():  # named_parameters() yields tied tensors once
        if not p.requires_grad:
            continue
        role = role_of.get(id(p), "vector")
        norm, kwargs = _fit_role(roles[role], p.ndim)
        key = (role, norm, repr(sorted(kwargs.items())), roles[role].scale)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "param_names": [],
                "norm": norm,
                "norm_kwargs": kwargs,
                "scale": roles[role].scale,
                "role": role,
            },
        )
        group["params"].append(p)
        group["param_names"].append(pname)
    order = {r: i for i, r in enumerate(ROLES)}
    return sorted(groups.values(), key=lambda g: order[g["role"]])


def newton_schulz_dtype(norm: Norm, shape: Sequence[int], device: torch.device | str) -> str:
    """How the LMO of ``norm`` orthogonalizes a tensor of ``shape`` on ``device``: the
    Newton–Schulz compute dtype (``"float32 (auto)"`` when chosen for the device), ``"svd"``,
    or ``""`` for norms that do not orthogonalize."""
    picked = norm.pick(shape)
    if not isinstance(picked, Spectral):
        return ""
    if picked.polar == "svd":
        return "svd (float64)"
    name = str(picked.compute_dtype(device)).removeprefix("torch.")
    return f"{name} (auto)" if picked.ns_dtype is None else name


def format_groups(groups: Iterable[Mapping[str, Any]]) -> str:
    """A readable table: each parameter, its shape, role, norm (with options), radius, and the
    dtype its Newton–Schulz computes in on the parameter's device (``(auto)``: chosen for the
    hardware, see :func:`scion_kernels.newton_schulz.default_compute_dtype`)."""
    rows = [("parameter", "shape", "role", "norm", "radius", "Newton–Schulz")]
    for gi, g in enumerate(groups):
        names = g.get("param_names") or [f"group{gi}[{i}]" for i in range(len(g["params"]))]
        given = g.get("norm", "Auto")
        kw = g.get("norm_kwargs") or {}
        if isinstance(given, Norm):
            given, kw = given.spec()
        norm_obj = make_norm(given, kw)
        norm = given + ("(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")" if kw else "")
        for name, p in zip(names, g["params"], strict=True):
            shape = "×".join(str(s) for s in p.shape) or "scalar"
            ns = newton_schulz_dtype(norm_obj, p.shape, p.device)
            rows.append((name, shape, str(g.get("role", "")), norm, f"{g.get('scale', '')}", ns))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
