"""``Scion`` and ``ScionLight``: the optimizer of Pethick et al. (2025).

Each param group's step runs on its route (:func:`scion_kernels.backends.route`): per
parameter a backend object, the fused Triton or CUDA kernels where the group's backend takes
the parameter, else the pure-PyTorch reference.

For every parameter ``x`` with gradient ``g`` in a group with learning rate ``γ`` (``lr``),
averaging factor ``α`` (``momentum``), radius ``ρ`` (``scale``) and a norm::

    d ← (1 − α)·d + α·g                    (d starts at 0; α = 1 keeps no buffer: d = g)
    u ← ρ·lmo(d)
    constrained   (SCG):  x ← (1 − γ)·x − γ·u
    unconstrained (uSCG): x ← x − γ·u

The constructor signature and its defaults are the authors' (``LIONS-EPFL/scion``,
``scion.py``); ``momentum`` is one minus the usual β (β = 0.9 is ``momentum=0.1``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from . import _checks, backends, distributed
from .backends import Backend, Update
from .backends.plan import fused_step_
from .distributed import local
from .elementwise import apply_update_, average_, scale_
from .norms import NORMS, Norm, make_norm, shared_draws

__all__ = ["Scion", "ScionLight"]

NONFINITE_POLICIES = _checks.NONFINITE_POLICIES


class _ScionBase(torch.optim.Optimizer):
    """What Scion and ScionLight share: options, per-group routes, the step skeleton, ``init()``."""

    #: Whether ``capturable=True`` with ``nonfinite="skip"`` is available (else why not).
    _skips_on_device = True
    _skips_on_device_not = ""
    #: Whether a distributed optimizer makes the state of groups of plain tensors up front
    #: too (buffers, harmless), not only of those spread across ranks.
    _state_in_every_group = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        momentum: float = 1.0,
        norm: str | Norm = "Auto",
        norm_kwargs: dict[str, Any] | None = None,
        scale: float = 1.0,
        unconstrained: bool = False,
        *,
        backend: str = "auto",
        buffer_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        process_group: Any | None = None,
        capturable: bool = False,
    ) -> None:
        if process_group is not None and not torch.distributed.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
        #: The replicas of plain-tensor parameters (DDP) that split the Spectral LMOs.
        self.process_group = process_group
        self._distributed = process_group is not None
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {nonfinite!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool; got {capturable!r}")
        if capturable and nonfinite == "raise":
            raise ValueError(
                "capturable=True needs nonfinite='skip' (decided on the device) or 'ignore': "
                "nonfinite='raise' reads every gradient on the host before the step"
            )
        if capturable and nonfinite == "skip" and not self._skips_on_device:
            raise ValueError(
                f"capturable=True with nonfinite='skip' is not available for "
                f"{type(self).__name__}: {self._skips_on_device_not}"
            )
        self.nonfinite = nonfinite
        #: Whether a step reads nothing on the host (see the class docstring). An attribute of
        #: the optimizer, not of its groups: torch.compile sets a group's ``"capturable"``.
        self.capturable = capturable
        #: Steps skipped because a gradient was not finite (``nonfinite="skip"``): an int, or
        #: in a capturable optimizer a one-element int64 tensor counted on the device.
        self.skipped_steps: int | Tensor = 0
        #: Each param group's route (:func:`scion_kernels.backends.route`), by index.
        self._routes: list[backends.Route] = []
        #: Each param group's options as they were last checked, by index.
        self._checked: dict[int, tuple[Any, ...]] = {}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            norm=norm,
            norm_kwargs={} if norm_kwargs is None else norm_kwargs,
            scale=scale,
            unconstrained=unconstrained,
            backend=backend,
            buffer_dtype=buffer_dtype,
            lr_scale=1.0,
        )
        # Options are checked before the parameters are read (``params`` may be a generator).
        self._check_options(dict(defaults), "the defaults")
        make_norm(norm, defaults["norm_kwargs"])
        super().__init__(params, defaults)
        if capturable and nonfinite == "skip":
            devices = [p.device for group in self.param_groups for p in group["params"]]
            device = devices[0] if devices else torch.device("cpu")
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    # ---------------------------------------------------------------------- groups and routes
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        if group["norm_kwargs"] is None:
            group["norm_kwargs"] = {}
        try:
            self._check_options(group, f"param group {index}")
            norm = make_norm(group["norm"], group["norm_kwargs"])
            _checks.check_params(group, index, norm, type(self).__name__)
            spread = self.process_group is not None or any(
                distributed._is_dtensor(p) for p in group["params"]
            )
            if spread:  # raises for placements it does not take, on every rank alike
                distributed.check_layouts(group["params"], self.process_group)
            if spread and self.capturable:
                raise ValueError(
                    f"capturable=True (param group {index}) is not available for parameters "
                    "spread across ranks (a process_group or DTensor parameters)"
                )
            resolved = dict(group)
            if isinstance(norm, Norm) and NORMS.get(norm.name) is type(norm):
                # Plain data in the group (a name and options), so state_dict() loads with
                # torch.load(weights_only=True) and equal configurations give equal state dicts.
                resolved["norm"], resolved["norm_kwargs"] = norm.spec()
            route = backends.route(resolved, f"param group {index}", norm, self.capturable)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        group["norm"], group["norm_kwargs"] = resolved["norm"], resolved["norm_kwargs"]
        self._store_route(index, route)
        self._checked[index] = self._options(group)
        every = self._state_in_every_group
        if spread and not self._distributed:
            self._distributed = True
            # Every rank's state has the same keys up front, in every group (DCP's loaders
            # fill only the entries that exist): the groups before this one too.
            for earlier in self.param_groups[:-1] if every else []:
                self._create_state(earlier)
        if spread or (self._distributed and every):
            self._create_state(group)

    def _check_options(self, group: dict[str, Any], where: str) -> None:
        """Raise a clear error for any option of ``group`` (described by ``where``) out of its
        domain."""
        _checks.check_options(group, where, getattr(self, "defaults", {}), type(self).__name__)
        if not self.capturable:
            return
        numbers = [k for k in ("scale", "lr_scale") if isinstance(group.get(k), Tensor)]
        if numbers:
            raise ValueError(
                f"capturable=True ({where}) takes {' and '.join(numbers)} as numbers (fixed into "
                "a captured graph); lr and momentum may be tensors, read on the device"
            )
        devices = {p.device for p in group.get("params", [])}
        for key in ("lr", "momentum"):
            option = group[key]
            if isinstance(option, Tensor) and any(
                d.type != "cpu" and d != option.device for d in devices
            ):
                raise ValueError(
                    f"capturable=True ({where}) needs a tensor {key} on the parameters' device "
                    f"({', '.join(sorted(map(str, devices)))}); got one on {option.device}: a "
                    "CPU tensor is read when a CUDA graph is captured, and fixed in it"
                )

    def _check_changed_options(self, index: int, group: dict[str, Any]) -> None:
        """Check group ``index``'s options when they differ from the ones checked last (a
        scheduler's new ``lr``, an option set by hand); tensor options every eager step (they
        can change in place), and in a compiled step only when the tensor is another one."""
        seen = self._options(group)
        checked = self._checked.get(index)
        # While torch.compile traces, and in a capturable optimizer, a tensor option is checked
        # when it is another tensor, not for its value (reading it would sync the host, break
        # the graph, or be fixed into a captured one).
        compiling = torch.compiler.is_compiling() or self.capturable
        if (
            checked is not None
            and len(checked) == len(seen)
            and all(
                (compiling and a is b)
                if isinstance(a, Tensor)
                else a is b or (type(a) is type(b) and a == b)
                for a, b in zip(seen, checked, strict=True)
            )
        ):
            return
        self._check_options(group, f"param group {index}")
        self._checked[index] = self._options(group)

    @staticmethod
    def _options(group: dict[str, Any]) -> tuple[Any, ...]:
        """The options of ``group`` that :func:`_checks.check_options` reads."""
        return tuple(group.get(key, _checks.MISSING) for key in _checks.CHECKED)

    def _route(self, index: int, group: dict[str, Any]) -> backends.Route:
        """Group ``index``'s route, resolved again only when its options or its parameters'
        shapes or devices changed. The check also runs while ``torch.compile`` traces, so
        the compiler guards on what it compares."""
        route = self._routes[index] if index < len(self._routes) else None
        if route is not None and route.matches(group):
            return route
        self._check_options(group, f"param group {index}")
        norm = make_norm(group["norm"], group["norm_kwargs"])
        _checks.check_params(group, index, norm, type(self).__name__)
        route = backends.route(group, f"param group {index}", norm, self.capturable)
        self._store_route(index, route)
        return route

    def _store_route(self, index: int, route: backends.Route) -> None:
        while len(self._routes) <= index:
            self._routes.append(None)  # type: ignore[arg-type]
        self._routes[index] = route

    # ------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for index, group in enumerate(self.param_groups):
            self._check_changed_options(index, group)
            # A parameter with no elements has nothing to update.
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None and p.numel()]
            for i in idx:
                if group["params"][i].grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"({_checks.label(group, index, i)})"
                    )
            if idx or self._distributed:
                work.append((index, group, idx))

        bad = None
        on_device = self.capturable and self.nonfinite == "skip"
        if self._distributed:
            check = self.nonfinite != "ignore"
            work, bad = distributed.agree_work(work, self.process_group, check, _checks.label)
        elif self.nonfinite != "ignore" and not on_device:
            bad = _checks.first_nonfinite(work)
        if bad is not None:
            self._nonfinite(work, *bad)
            return loss

        # Every route is resolved (and may raise) before any parameter changes.
        routes = [self._route(index, group) for index, group, idx in work if idx]
        kept = self._keep_for_a_skip(work) if on_device else None
        for (_, group, idx), route in zip([w for w in work if w[2]], routes, strict=True):
            self._step_group(group, idx, route)
        if kept is not None:
            self._skip_on_device(*kept)
        return loss

    def _keep_for_a_skip(
        self, work: list[tuple[int, dict[str, Any], list[int]]]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """Before a capturable step with ``nonfinite="skip"``: whether every gradient is
        finite (a device bool, read by no one on the host), every parameter and buffer the step
        changes, and a copy of each."""
        grads: list[Tensor] = []
        changed: list[Tensor] = []
        for _, group, idx in work:
            if not idx:
                continue
            grads.extend(local(group["params"][i].grad) for i in idx)
            changed.extend(local(group["params"][i]) for i in idx)
            bufs = self._fused_buffers(group, idx)  # made here on a first step, then kept
            if bufs is not None:
                changed.extend(local(b) for b in bufs)
        if not grads:
            return None
        return _checks.all_finite(grads), changed, torch._foreach_mul(changed, 1.0)

    def _skip_on_device(self, finite: Tensor, changed: list[Tensor], saved: list[Tensor]) -> None:
        """After the step: each changed tensor keeps its new value where every gradient was
        finite, else gets its copy back (one select each, on the device); the skip is counted
        in ``skipped_steps`` there."""
        for t, old in zip(changed, saved, strict=True):
            torch.where(finite.to(t.device), t, old, out=t)
        skipped = self.skipped_steps
        assert isinstance(skipped, Tensor)
        skipped.add_(finite.logical_not().to(skipped.device))

    def _step_group(self, group: dict[str, Any], idx: list[int], route: backends.Route) -> None:
        """Step parameters ``idx`` of ``group``: the fused backends its route names, then the
        reference on the rest (or the LMOs across ranks)."""
        params = [group["params"][i] for i in idx]
        # A tensor lr stays a tensor (no host sync: torch.compile traces it as an input); the
        # fused kernels read it on the device.
        lr = group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"])
        lr_scale, scale = float(group["lr_scale"]), float(group["scale"])
        constrained = not group["unconstrained"]
        left = idx
        if not self._distributed:
            left = [i for i in idx if not route.backends[i].fused]
            fused: dict[str, tuple[Backend, list[int]]] = {}
            for i in idx:
                if route.backends[i].fused:
                    fused.setdefault(route.backends[i].name, (route.backends[i], []))[1].append(i)
            if fused:
                update = Update(_momentum(group), lr, scale, constrained, lr_scale)
            for backend, ks in fused.values():
                chosen = [group["params"][i] for i in ks]
                undone = fused_step_(
                    backend,
                    chosen,
                    [p.grad for p in chosen],
                    self._fused_buffers(group, ks),
                    [route.norms[i] for i in ks],
                    update,
                )
                left = left + [ks[j] for j in undone]
            left = sorted(left)
        if left:
            rest = [group["params"][i] for i in left]
            directions = self._averaged(group, left)
            if self._distributed:
                polars = [route.polars[i] for i in left]
                updates = distributed.group_updates(
                    route.norm, rest, directions, self.process_group, polars
                )
            else:
                updates = route.norm.lmo_many(directions)
            gamma = lr * lr_scale if lr_scale != 1.0 else lr
            if self._distributed:
                rest = [local(p) for p in rest]
            apply_update_(rest, updates, gamma, scale, constrained)
        self._after_update(group, params)

    def _nonfinite(
        self, work: list[tuple[int, dict[str, Any], list[int]]], index: int,
        group: dict[str, Any], i: int,
    ) -> None:  # fmt: skip
        """A gradient is not finite: raise, or skip the step (``nonfinite``)."""
        where = _checks.label(group, index, i)
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"the gradient of {where} (shape {tuple(group['params'][i].shape)}) "
                "has non-finite values; no parameter or state was changed. Pass "
                "nonfinite='skip' to skip such steps instead."
            )
        self.skipped_steps += 1
        self._on_skip(work)
        warnings.warn(
            f"{type(self).__name__} skipped a step: the gradient of {where} has non-finite values "
            f"({self.skipped_steps} skipped so far)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _fused_buffers(self, group: dict[str, Any], idx: list[int]) -> list[Tensor] | None:
        """The averaging buffers of parameters ``idx`` of ``group`` (each with a gradient),
        which the fused step updates in place, or ``None`` (d = g)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        """torch.optim's listing of each group's options, plus what steps its parameters (the
        backend objects of its route, with the reason for any fallback to the reference) and
        the dtype their Newton–Schulz computes in (``(auto)``: chosen for the hardware)."""
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {key}: {group[key]}" for key in sorted(group) if key != "params"]
            try:
                route = self._route(i, group)
            except (ValueError, TypeError) as err:
                lines.append(f"    route: {err}")
                continue
            lines.append(f"    stepped by: {backends.summary(route)}")
            ns = {route.newton_schulz(k) for k in range(len(group["params"]))} - {""}
            if ns:
                lines.append(f"    newton_schulz: {', '.join(sorted(ns))}")
        return "\n".join(lines) + "\n)"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            nonfinite=self.nonfinite, skipped_steps=self.skipped_steps, capturable=self.capturable
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A process group does not pickle: an unpickled optimizer steps on its own ranks' data.
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("_distributed", False)
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("_routes", [])
        self.__dict__.setdefault("_checked", {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, keeping every state tensor's dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to its parameter's
        dtype; Scion's buffers have their own (``buffer_dtype``: e.g. a float32 average of
        bf16 weights), so they come back in the dtype they were saved in, bit for bit.
        """
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            for key, value in saved.get(pid, {}).items():
                loaded = self.state[p].get(key)
                if isinstance(value, Tensor) and isinstance(loaded, Tensor):
                    if loaded.dtype != value.dtype:
                        self.state[p][key] = value.to(device=loaded.device, copy=True)
        # The loaded options (tensors among them, copies now) are checked here, eagerly, so a
        # compiled step after loading has nothing to read on the host.
        for index, group in enumerate(self.param_groups):
            self._check_options(group, f"param group {index}")
            self._checked[index] = self._options(group)

    def _create_state(self, group: dict[str, Any]) -> None:
        """Create the state of ``group``'s parameters now (distributed optimizers), so every
        rank has the same state keys from the start, as ``torch.distributed.checkpoint``
        needs."""

    # Hooks the two variants fill in.
    def _averaged(self, group: dict[str, Any], idx: list[int]) -> list[Tensor]:
        """The averaged directions ``d`` of parameters ``idx`` of ``group``, updated."""
        raise NotImplementedError

    def _after_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        pass

    def _on_skip(self, work: list[tuple[int, dict[str, Any], list[int]]]) -> None:
        pass

    # ------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init(self, *, draws: Literal["independent", "shared"] = "independent") -> None:
        """Put every parameter on the sphere of radius ``scale`` of its group's norm.

        As the authors: orthogonal times ``s`` (Spectral, per kernel tap for SpectralConv),
        random ``±1/d_in`` (Sign), Gaussian normalized like the LMO (ColNorm, RowNorm), zeros
        (BiasRMS) — then multiplied by ρ. Drawn on the parameters' device, in float32 (float64
        for float64 parameters), then rounded once to their dtype. Groups with ``init=False``
        are left as they are: :func:`~scion_kernels.param_groups` sets it for normalization
        gains, layer scales, position embeddings and other vectors that are not biases (zero
        gains would silence the layers they scale) and for ``free`` parameters (attention
        bias tables, state-space parameters, temperatures). Parameters on the ``meta`` device
        are refused at once (``ValueError``), before anything is written.

        ``draws``: ``"independent"`` (the default, as the authors) draws every orthogonal
        matrix on its own, one QR each. ``"shared"`` draws one per shape and gives each matrix
        of that shape a copy with its rows permuted and its rows' and columns' signs flipped at
        random (:func:`~scion_kernels.norms.shared_draws`): each matrix is still exactly
        Haar-distributed, but matrices of one shape are no longer independent of each other.
        The QRs dominate a large model's init on a CPU (a 1.1B-parameter Llama: about 6.5
        TFLOP); ``"shared"`` leaves only memory traffic.

        Across ranks every replica gets the same values: a DTensor parameter is drawn whole
        and distributed from the first rank (``distribute_tensor``), a plain one under a
        ``process_group`` is broadcast from that group's first rank.
        """
        if draws not in ("independent", "shared"):
            raise ValueError(f'draws must be "independent" or "shared", got {draws!r}')
        on_meta = [
            name
            for index, group in enumerate(self.param_groups)
            if group.get("init", True)
            for name, p in zip(_names(group), group["params"], strict=True)
            if local(p).is_meta
        ]
        if on_meta:
            shown = ", ".join(on_meta[:3]) + (
                f" and {len(on_meta) - 3} more" if len(on_meta) > 3 else ""
            )
            raise ValueError(
                f"init() writes values, and {shown} {'is' if len(on_meta) == 1 else 'are'} on "
                "the meta device, which holds none. Materialize the model first "
                "(model.to_empty(device=...)), then call init()"
            )
        with shared_draws() if draws == "shared" else contextlib.nullcontext():
            for index, group in enumerate(self.param_groups):
                if not group.get("init", True):
                    continue
                norm = self._route(index, group).norm
                for p in group["params"]:
                    if p.numel():
                        distributed.init_(norm, p, float(group["scale"]), self.process_group)


def _momentum(group: dict[str, Any]) -> float | Tensor:
    """The group's α: a number, or a tensor (one element, read on the device by the step)."""
    momentum = group["momentum"]
    return momentum.reshape(()) if isinstance(momentum, Tensor) else float(momentum)


def _averages(group: dict[str, Any]) -> bool:
    """Whether the group keeps an average: ``momentum < 1``, or a tensor ``momentum``, whose
    value the step does not read on the host."""
    momentum = group["momentum"]
    return isinstance(momentum, Tensor) or float(momentum) != 1.0


def _by_kind(tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` split by device and dtype, in order."""
    kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.device, t.dtype), []).append(t)
    return list(kinds.values())


def _names(group: dict[str, Any]) -> list[str]:
    """The group's parameter names (``param_names``), or ``group[i]`` labels."""
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"parameter {i} of a group" for i in range(len(group["params"]))]


class Scion(_ScionBase):
    """Scion: stochastic conditional gradient with a norm-ball LMO per layer.

    ::

        d ← (1 − α)·d + α·g;   u ← ρ·lmo(d)
        x ← (1 − γ)·x − γ·u    (constrained, the default)   or   x ← x − γ·u  (unconstrained)

    Args:
        params: parameters, ``(name, parameter)`` pairs, or dicts defining parameter groups
            (see :func:`scion_kernels.param_groups`).
        lr: γ, the learning rate (default 1e-3); ``0 ≤ γ ≤ 1`` for the constrained step.
        momentum: α, one minus the usual momentum β (default 1.0: no averaging); ``0 < α ≤ 1``.
            A one-element tensor is read on the device each step (a warm-up schedule changes
            it in place); the group then always keeps an average, even at α = 1.
        norm: ``"Auto"`` (default), ``"Spectral"``, ``"SpectralConv"``, ``"Sign"``, ``"ColNorm"``,
            ``"RowNorm"``, ``"BiasRMS"``, or a :class:`~scion_kernels.norms.Norm` instance.
        norm_kwargs: the norm's options (e.g. ``{"steps": 5, "coefficients": "polar_express"}``).
        scale: ρ, the radius of the norm ball (default 1.0).
        unconstrained: use ``x ← x − γ·u`` (uSCG) instead of the Frank–Wolfe step.
        backend: ``"torch"`` (the pure-PyTorch reference, batched), ``"triton"`` (the fused
            Triton step: Spectral-family parameters with bf16/fp16 Newton–Schulz, and Sign,
            ColNorm, RowNorm, BiasRMS; parameters it cannot take, e.g. ``polar="svd"``, take
            the reference path), ``"cuda"`` (the native CUDA C++ step, the same parameters),
            or ``"auto"``: per device and shape class, the backend the committed timing table
            (``scion_kernels/backends/auto_table.py``, from ``python -m bench.choose_backends``)
            names, and the reference where it names none (every device, for now).
        buffer_dtype: dtype of the averaging buffer ``d`` (default: the gradient's; the
            parameter's for a buffer made before its first gradient).
        nonfinite: what a NaN or ±inf gradient does: ``"raise"`` (default) raises
            ``FloatingPointError`` naming the parameter, before anything changes; ``"skip"``
            skips the whole step with a ``RuntimeWarning`` and counts it in ``skipped_steps``;
            ``"ignore"`` checks nothing (no host sync) and lets NaN propagate.
        capturable: a step that reads nothing on the host, so it can be captured in a CUDA
            graph (torch's name). Needs ``nonfinite="ignore"``, or ``"skip"`` decided on the
            device: the step runs, and where a gradient was not finite every parameter and
            buffer it changed gets its value back (a copy of them per step, and a select),
            with no warning; ``skipped_steps`` is then a tensor counted on the device
            (``Scion`` only: ``ScionLight``'s average in ``p.grad`` cannot be put back). To
            schedule ``lr`` or ``momentum``, a one-element tensor on the parameters' device,
            changed in place (``scale`` and ``lr_scale`` must be numbers); a number is fixed
            into a captured graph. Tensor options are checked when they are replaced, not when
            they change in place. Every backend takes it (the fused kernels read tensor ``lr``
            and ``momentum`` on the device, and make their tables in the warm-up steps before a
            capture); a backend that declares otherwise leaves its parameters to the
            reference, as ``print(optimizer)`` says. Parameters spread across ranks are
            refused.
        process_group: the ranks holding replicated copies of plain-tensor parameters (after
            DDP has averaged their gradients): each Spectral-family LMO is computed on one of
            them and shared (:mod:`scion_kernels.distributed`). DTensor parameters (FSDP2's
            ``fully_shard``, tensor parallelism's ``parallelize_module`` on its own mesh) are
            split across ranks without it. Either way every rank of the
            group must call ``step()``; the step then runs the reference, except the
            Newton–Schulz iterations, which use the ``backend`` kernels where they apply.

    A group may also set ``init=False``: :meth:`init` leaves its parameters as they are (what
    :func:`~scion_kernels.param_groups` does for vectors other than biases), and ``lr_scale``
    (default 1): the group steps with ``γ·lr_scale`` in place of ``γ``, in the step and the
    shrink alike, whatever a scheduler sets ``lr`` to (what ``param_groups`` gives each role
    of a model with a tied head).

    Schedulers may change ``lr`` and ``momentum`` (α) of a group; one that cycles momentum
    in the β convention (``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True``) is
    refused at the next step with a ``ValueError`` saying so.

    Constrained Scion has no separate weight decay: the ``(1 − γ)`` shrink is it. The averaging
    buffer is saved in ``state_dict`` as ``"momentum_buffer"``, the authors' key.
    """

    def _averaged(self, group: dict[str, Any], idx: list[int]) -> list[Tensor]:
        bufs = self._fused_buffers(group, idx)
        grads = [group["params"][i].grad for i in idx]
        if self._distributed:  # DTensors: their local shards
            grads = [local(g) for g in grads]
            bufs = None if bufs is None else [local(b) for b in bufs]
        if bufs is None:
            return grads
        average_(bufs, grads, _momentum(group))
        return bufs

    def _create_state(self, group: dict[str, Any]) -> None:
        if not _averages(group):
            return
        for p in group["params"]:
            if "momentum_buffer" not in self.state[p]:
                like = p if p.grad is None else p.grad
                dtype = group["buffer_dtype"] or like.dtype
                self.state[p]["momentum_buffer"] = torch.zeros_like(like, dtype=dtype)

    def _init_group(self, group: dict[str, Any], idx: tuple[int, ...], bufs: list[Tensor]) -> None:
        """Append to ``bufs`` the averaging buffer of parameters ``idx`` of ``group`` (each with
        a gradient), creating those not made yet. ``torch.compile`` runs a method of this name
        eagerly while it traces, as for torch's own optimizers (its arguments: a group,
        constants, empty lists), and reads back the lists it filled: a compiled step finds its
        state."""
        for i in idx:
            p = group["params"][i]
            state = self.state[p]
            if "momentum_buffer" not in state:
                dtype = group["buffer_dtype"] or p.grad.dtype
                state["momentum_buffer"] = torch.zeros_like(p.grad, dtype=dtype)
            bufs.append(state["momentum_buffer"])

    def _fused_buffers(self, group: dict[str, Any], idx: list[int]) -> list[Tensor] | None:
        if not _averages(group):
            return None
        bufs: list[Tensor] = []
        self._init_group(group, tuple(idx), bufs)  # a list argument is read back as output
        return bufs


class ScionLight(_ScionBase):
    """Scion without a separate buffer: the average lives in ``p.grad``.

    After each update ``p.grad *= (1 − α)``, and the next backward pass adds ``g``, so
    ``p.grad = d/α`` with ``d`` Scion's average; every LMO is invariant to that positive
    scale, so the steps are Scion's while storing one tensor fewer per parameter.

    Arguments are :class:`Scion`'s (``buffer_dtype`` does not apply: the buffer is ``p.grad``).

    What you must not do with ``momentum < 1``:

    - **Zero the gradients** (``optimizer.zero_grad()``, ``model.zero_grad()``, or setting
      ``p.grad = None``): that erases the average. :meth:`zero_grad` on this optimizer only
      clears groups with ``momentum == 1`` and warns about the others.
    - **Clip without care**: clipping ``p.grad`` rescales the stored average, not just the new
      gradient; norm-based clipping compares the norm of ``d/α`` (about ``1/α`` times a
      gradient's) with the threshold. Since the LMOs are scale-invariant, clipping is rarely
      needed; if you clip, clip the gradient before it is added (e.g. with hooks).
    - **Scale gradients for accumulation** without undoing it: dividing ``p.grad`` divides the
      average too.

    The buffer is saved in ``state_dict`` (key ``"grad_state"``) and put back into ``p.grad``
    by ``load_state_dict``. A non-finite gradient has already been added to the buffer when
    ``step`` sees it: with ``nonfinite="raise"`` reset that buffer (``p.grad.zero_()``) or
    reload a checkpoint before stepping again; with ``nonfinite="skip"`` the skipped step resets
    the buffer of every parameter whose gradient was not finite (its average is lost: there is
    no copy).
    """

    # Its state is p.grad: made up front it would step parameters that never get a gradient.
    _state_in_every_group = False
    _skips_on_device = False
    _skips_on_device_not = (
        "its average lives in p.grad, which a non-finite gradient has already changed when "
        "the step sees it; use Scion, or nonfinite='ignore'"
    )

    #: ``torch.amp.GradScaler`` hands this optimizer the scale and the overflow flag instead of
    #: unscaling ``p.grad`` (the running average) itself; see :meth:`step`.
    _step_supports_amp_scaling = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._warned_zero_grad = False
        super().__init__(*args, **kwargs)

    def _check_options(self, group: dict[str, Any], where: str) -> None:
        super()._check_options(group, where)
        if group["buffer_dtype"] is not None:
            raise ValueError(
                "ScionLight keeps its average in p.grad, in the gradient's dtype; "
                f"buffer_dtype must be None (got {group['buffer_dtype']!r} in {where})"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (see :meth:`Scion.step`).

        Under ``torch.amp.GradScaler``: groups with ``momentum < 1`` are refused with a
        ``RuntimeError`` before anything changes, since the scaler's unscaling and overflow
        handling act on ``p.grad``, which holds the running average (an overflow would leave
        ``inf`` in it for good). Use :class:`Scion`, whose average has its own buffer, with a
        GradScaler. Groups with ``momentum == 1`` step as with any optimizer: skipped when the
        scaler found an overflow, on unscaled gradients otherwise.
        """
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is None:
            return super().step(closure)
        averaging = [i for i, g in enumerate(self.param_groups) if _averages(g)]
        if averaging:
            raise RuntimeError(
                "ScionLight cannot be used with torch.amp.GradScaler when momentum < 1 "
                f"(param group {averaging[0]}): it keeps the running average in p.grad, which "
                "the scaler unscales and, after an overflow, leaves non-finite for every later "
                "step. Use Scion (the average in its own buffer) with a GradScaler, or bf16 "
                "autocast, which needs no scaler."
            )
        if bool(found_inf.item()):
            return None
        scale = getattr(self, "grad_scale", None)  # None: the gradients are unscaled already
        if scale is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(scale.to(p.grad.device))
        return super().step(closure)

    def _averaged(self, group: dict[str, Any], idx: list[int]) -> list[Tensor]:
        return [local(group["params"][i].grad) for i in idx]

    def _fused_buffers(self, group: dict[str, Any], idx: list[int]) -> list[Tensor] | None:
        return None  # the average is p.grad itself

    def _create_state(self, group: dict[str, Any]) -> None:
        if not _averages(group):
            return
        for p in group["params"]:
            if p.grad is None and p.requires_grad:  # a frozen parameter never steps
                p.grad = torch.zeros_like(p)

    def _after_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if _averages(group):
            alpha = _momentum(group)
            grads = [local(p.grad) for p in params]
            for kind in _by_kind(grads):
                scale_(kind, 1.0 - alpha)

    def _on_skip(self, work: list[tuple[int, dict[str, Any], list[int]]]) -> None:
        for _, group, idx in work:
            for i in idx:
                g = local(group["params"][i].grad)
                if not bool(torch.isfinite(g).all()):
                    g.zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of groups with ``momentum == 1`` only.

        Groups with ``momentum < 1`` keep ``p.grad``: it holds their running average.
        """
        kept = False
        for group in self.param_groups:
            if not _averages(group):
                for p in group["params"]:
                    if p.grad is not None:
                        if set_to_none:
                            p.grad = None
                        else:
                            p.grad.detach_().requires_grad_(False).zero_()
            elif any(p.grad is not None for p in group["params"]):
                kept = True
        if kept and not self._warned_zero_grad:
            self._warned_zero_grad = True
            warnings.warn(
                "ScionLight.zero_grad() kept the gradients of groups with momentum < 1: they "
                "hold the running average. Do not zero them by other means either.",
                UserWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state; each average in ``p.grad`` is saved as ``"grad_state"``."""
        self._store_grads_in_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; each saved ``"grad_state"`` is copied into ``p.grad``."""
        super().load_state_dict(state_dict)
        self._load_grads_from_state()

    def _store_grads_in_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["grad_state"] = p.grad
                elif p in self.state:
                    self.state[p].pop("grad_state", None)

    def _load_grads_from_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "grad_state" in state:
                    # A copy, so two optimizers loaded from one state dict never share a buffer.
                    p.grad = state["grad_state"].detach().clone()
                    state["grad_state"] = p.grad
                else:
                    p.grad = None

    def __getstate__(self) -> dict[str, Any]:
        self._store_grads_in_state()
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_warned_zero_grad", False)
        self._load_grads_from_state()
