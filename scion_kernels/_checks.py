"""What the optimizer checks: a param group's options, its parameters, and the gradients of a
step. Every check raises an error that names the group or parameter and says what to do."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import backends
from .norms import Norm, describe_misfit

__all__ = [
    "CHECKED",
    "MISSING",
    "NONFINITE_POLICIES",
    "check_options",
    "check_params",
    "first_nonfinite",
    "label",
]

NONFINITE_POLICIES = ("raise", "skip", "ignore")
#: The group keys :func:`check_options` reads, and the value of one that is absent.
CHECKED = (
    "lr", "lr_scale", "unconstrained", "weight_decay", "base_momentum", "max_momentum", "init",
    "momentum", "scale", "backend", "buffer_dtype", "norm_kwargs",
)  # fmt: skip
MISSING = object()
_BUFFER_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _number(value: Any, name: str, where: str) -> float:
    """Option ``name`` of ``where`` as a float: a number, or a 1-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"Tensor {name} must be 1-element; got shape {shape} in {where}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} ({where}) must be a number; got {value!r}")
    return float(value)


def label(group: dict[str, Any], index: int, i: int) -> str:
    """How errors name parameter ``i`` of param group ``index``."""
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    return f"parameter {i} of param group {index}"


def check_options(
    group: dict[str, Any], where: str, defaults: dict[str, Any], owner: str = "Scion"
) -> None:
    """Raise a clear error for any option of ``group`` (described by ``where``) out of its
    domain; ``owner``: the optimizer's class name, as the messages say it."""
    # Groups restored from a checkpoint of the authors' Scion lack our extra options.
    for key in ("backend", "buffer_dtype", "lr_scale"):
        if key not in group:
            group[key] = defaults[key]
    lr = _number(group["lr"], "lr", where)
    if not (0.0 <= lr < math.inf):
        raise ValueError(f"Invalid learning rate {lr} in {where}: lr must be ≥ 0 and finite")
    lr_scale = _number(group["lr_scale"], "lr_scale", where)
    if not (0.0 < lr_scale < math.inf):
        raise ValueError(f"Invalid lr_scale {lr_scale} in {where}: it must be > 0 and finite")
    if not isinstance(group["unconstrained"], bool):
        raise TypeError(f"unconstrained must be a bool in {where}")
    if not group["unconstrained"] and lr * lr_scale > 1.0:
        scaled = f" (lr {lr} × lr_scale {lr_scale})" if lr_scale != 1.0 else ""
        raise ValueError(
            f"Invalid learning rate {lr * lr_scale}{scaled} in {where}: the constrained step "
            "x ← (1 − lr)·x − lr·ρ·lmo(d) needs lr ≤ 1 (lr > 1 flips the sign of the "
            "weights); use unconstrained=True for larger steps"
        )
    # AdamW-style groupings give biases and gains weight_decay=0.0: nothing to refuse.
    if "weight_decay" in group and _number(group["weight_decay"], "weight_decay", where):
        raise ValueError(
            f"{where} has weight_decay={group['weight_decay']}, which {owner} does not take: "
            "the constrained step's (1 − lr) shrink is its weight decay. Groups with "
            "weight_decay are what HF Trainer builds for optimizer_cls_and_kwargs, and they "
            "carry no norms or radii; build the optimizer with "
            "scion_kernels.param_groups(model, recipe) and pass "
            "Trainer(optimizers=(optimizer, None)) instead"
        )
    cycled = sorted({"base_momentum", "max_momentum"} & set(group))
    if cycled:
        raise ValueError(
            f"{where} has {cycled}: a scheduler that cycles momentum (OneCycleLR or CyclicLR "
            "with cycle_momentum=True, their default) writes the usual β (0.85–0.95) into "
            f"group['momentum'], but {owner}'s momentum is α = 1 − β, the weight of the new "
            "gradient, so β = 0.95 would run as α = 0.95 (almost no averaging). Pass "
            "cycle_momentum=False to the scheduler; to schedule α, set group['momentum'] "
            "yourself"
        )
    init = group.get("init", True)
    if not isinstance(init, bool):
        raise TypeError(f"init must be a bool in {where} (False: init() leaves the group)")
    momentum = _number(group["momentum"], "momentum", where)
    if not (0.0 < momentum <= 1.0):
        raise ValueError(
            f"Invalid momentum {momentum} in {where}: it is the averaging factor α of "
            "d ← (1 − α)·d + α·g and must satisfy 0 < α ≤ 1 (β = 0.9 is momentum=0.1)"
        )
    scale = _number(group["scale"], "scale", where)
    if not (0.0 < scale < math.inf):
        raise ValueError(f"Invalid scale {scale} in {where}: the radius ρ must be > 0, finite")
    backend = group["backend"]
    if backend not in backends.names():
        raise ValueError(
            f"unknown backend {backend!r} in {where}; expected one of {backends.names()}"
        )
    buffer_dtype = group["buffer_dtype"]
    if buffer_dtype is not None and buffer_dtype not in _BUFFER_DTYPES:
        raise ValueError(
            f"buffer_dtype must be None (the gradient's dtype) or one of {_BUFFER_DTYPES}; "
            f"got {buffer_dtype!r} in {where}"
        )
    if not isinstance(group["norm_kwargs"], dict):
        raise TypeError(f"norm_kwargs must be a dict in {where}")


def check_params(group: dict[str, Any], index: int, norm: Norm, owner: str = "Scion") -> None:
    """Raise for a parameter of group ``index`` that ``owner`` cannot step with ``norm``."""
    for i, p in enumerate(group["params"]):
        if p.is_complex():
            raise ValueError(
                f"{owner} does not support complex parameters: {label(group, index, i)} is "
                f"{p.dtype}. The LMOs here are defined for real tensors; keep the real and "
                "imaginary parts as separate real parameters"
            )
        msg = describe_misfit(norm, p.shape, label(group, index, i))
        if msg:
            raise ValueError(msg)


def all_finite(grads: Sequence[Tensor]) -> Tensor:
    """Whether every entry of every tensor of ``grads`` is finite, as a 0-dim bool tensor on the
    first one's device, decided there (no host sync): their max-norms, which no finite entry
    overflows (a 2-norm can), are all finite."""
    device = grads[0].device
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    ok: Tensor | None = None
    for gs in by_kind.values():
        finite = torch.stack(torch._foreach_norm(gs, ord=math.inf)).isfinite().all()
        finite = finite.to(device)
        ok = finite if ok is None else ok & finite
    assert ok is not None
    return ok


def first_nonfinite(
    work: list[tuple[int, dict[str, Any], list[int]]],
) -> tuple[int, dict[str, Any], int] | None:
    """The first parameter whose gradient has a NaN or ±inf (one host sync per device)."""
    where, grads = [], []
    for index, group, idx in work:
        for i in idx:
            where.append((index, group, i))
            grads.append(group["params"][i].grad)
    if not grads:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for k, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(k)
    first = None
    for ks in by_device.values():
        # The 2-norm is the cheap screen (a NaN or inf entry makes it non-finite); only the
        # tensors it flags are confirmed with the max-norm, since a large finite gradient
        # can overflow its 2-norm.
        norms = torch._foreach_norm([grads[k] for k in ks])
        finite = torch.isfinite(torch.stack([a.float() for a in norms]))
        if bool(finite.all()):
            continue
        for j in (~finite).nonzero().flatten().tolist():
            if not bool(torch.isfinite(torch.linalg.vector_norm(grads[ks[j]], math.inf))):
                first = ks[j] if first is None else min(first, ks[j])
                break
    return None if first is None else where[first]
