"""What a backend is: the :class:`Backend` base class, its :class:`Capabilities` (data, read at
construction), and the per-architecture policy lookup.

A backend is an object. It says on which devices it runs (:meth:`Backend.unavailable_reason`),
which parameters it takes (:meth:`Backend.refusal`, from its capabilities), and runs the three
kernel entry points of the package's ops (:mod:`.ops`): ``ns_step_``, ``grouped_step_`` and
``polar_`` (for the op ``scion_kernels::polar``). The plan (:mod:`.plan`) turns a param group's
step into calls of those entry points, the same for every fused backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from ..norms import Norm, Spectral

__all__ = ["Backend", "Capabilities", "Update", "below_floor", "capability", "for_arch"]

P = TypeVar("P")

#: The norms whose LMO is per group (rows, columns, or the whole tensor): one
#: ``grouped_step_`` kernel family.
GROUPED_NORMS = ("Sign", "ColNorm", "RowNorm", "BiasRMS")
SPECTRAL_NORMS = ("Spectral", "SpectralConv")
#: The half-precision dtypes the kernels' Newton–Schulz operands take.
HALF = (torch.bfloat16, torch.float16)


class Update(NamedTuple):
    """The step's scalars: ``d ← (1 − α)·d + α·g``, then ``x ← (1 − γ)·x − γ·ρ·u``
    (``constrained``) or ``x ← x − γ·ρ·u``, with ``γ = lr·lr_scale``. ``alpha`` and ``lr`` are
    numbers, or one-element tensors that the kernels read on the device (:attr:`device_alpha`,
    :attr:`device_lr`)."""

    alpha: float | Tensor
    lr: float | Tensor
    scale: float
    constrained: bool
    lr_scale: float = 1.0

    @property
    def device_alpha(self) -> Tensor | None:
        """``alpha`` when it is a tensor (the kernels read it there), else ``None``."""
        return self.alpha if isinstance(self.alpha, Tensor) else None

    @property
    def number_alpha(self) -> float:
        """``alpha`` when it is a number; 1.0 when it is a tensor (then not used)."""
        return 1.0 if isinstance(self.alpha, Tensor) else float(self.alpha)

    @property
    def device_lr(self) -> Tensor | None:
        """``lr`` when it is a tensor: then :attr:`coef` and :attr:`decay` are per unit of it,
        and the kernels form ``coef·lr`` and ``1 − decay·lr``."""
        return self.lr if isinstance(self.lr, Tensor) else None

    @property
    def decay(self) -> float:
        """The factor of ``x``: ``1 − γ`` (constrained) or 1; with a tensor ``lr``, the factor
        of ``lr`` that ``1 −`` takes: ``lr_scale`` (constrained) or 0."""
        if isinstance(self.lr, Tensor):
            return self.lr_scale if self.constrained else 0.0
        return 1.0 - self.lr * self.lr_scale if self.constrained else 1.0

    @property
    def coef(self) -> float:
        """The factor of ``u``: ``−γ·ρ``; with a tensor ``lr``, per unit of it:
        ``−lr_scale·ρ``."""
        if isinstance(self.lr, Tensor):
            return -self.lr_scale * self.scale
        return -(self.lr * self.lr_scale) * self.scale


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels take, as data. A parameter outside it steps on the reference,
    decided when its route is built (:meth:`Backend.refusal`)."""

    #: Device types the kernels run on (``"*"``: any). A route refuses other devices with
    #: the backend's :meth:`Backend.unavailable_reason`, which also says when a listed device
    #: cannot run them here (no Triton, no built module, an older GPU).
    devices: tuple[str, ...]
    #: Norm names (after ``Auto`` picks) whose whole step the kernels run (``"*"``: any).
    norms: tuple[str, ...] = (*SPECTRAL_NORMS, *GROUPED_NORMS)
    #: Spectral ``polar`` options the kernels run.
    polars: tuple[str, ...] = ("newton_schulz",)
    #: Only matrices (and groups) that are a reshape of the parameter: not ``split`` blocks.
    reshapes_only: bool = True
    #: Dtypes of the parameter, its gradient and its buffer.
    tensor_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    #: Newton–Schulz operand dtypes, the default (``ns_dtype=None``) first.
    compute_dtypes: tuple[torch.dtype, ...] = HALF
    #: The most Newton–Schulz steps one call runs (``None``: no limit).
    max_steps: int | None = None
    #: The lowest CUDA compute capability the kernels are built for.
    min_capability: tuple[int, int] = (8, 0)
    #: Whether a step can be captured in a CUDA graph (``capturable=True``): a tensor ``lr``
    #: read on the device, nothing read on the host, nothing copied to the device once the
    #: warm-up steps have run.
    capturable: bool = False


def capability(device: torch.device) -> tuple[int, int] | None:
    """``device``'s CUDA compute capability, or ``None`` (not a CUDA device, or a PyTorch
    without CUDA: nothing can run there, and the caller says so)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def below_floor(backend: Backend, device: torch.device) -> str | None:
    """Why ``device`` is older than ``backend``'s ``min_capability``, or ``None``."""
    have, need = capability(device), backend.capabilities.min_capability
    if have is None or have >= need:
        return None
    return (f"the {backend.name} kernels need compute capability {need[0]}.{need[1]} or newer; "
            f"{device} has {have[0]}.{have[1]}")  # fmt: skip


def for_arch(policies: Mapping[tuple[int, int], P], capability: tuple[int, int]) -> P:
    """The policy of the newest architecture in ``policies`` that ``capability`` has (the
    keys are compute capabilities; the lowest is the floor)."""
    fitting = [arch for arch in policies if arch <= capability]
    return policies[max(fitting) if fitting else min(policies)]


class Backend:
    """A backend: a name, capabilities, and the kernels behind the package's ops.

    Subclasses set :attr:`name` and :attr:`capabilities` and implement
    :meth:`unavailable_reason`, :meth:`ns_step_`, :meth:`grouped_step_` and :meth:`polar_`
    (the reference implements none of the kernels: :attr:`fused` is false).
    """

    name: str = ""
    capabilities: Capabilities = Capabilities(devices=())
    #: Whether the backend runs the whole step in its kernels (false: the reference, which
    #: the optimizer runs itself).
    fused: bool = True

    def __repr__(self) -> str:
        return f"<backend {self.name!r}>"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why the kernels cannot run on ``device``, or ``None`` if they can: here, a device
        type outside the declared ``devices``; subclasses add what else they need (calling
        this first)."""
        devices = self.capabilities.devices
        if "*" in devices or device.type in devices:
            return None
        return (f"the {self.name} kernels run on {' and '.join(devices)} tensors (got a "
                f"{device.type} tensor)")  # fmt: skip

    def compute_dtype(self, norm: Spectral, device: torch.device) -> torch.dtype:
        """The Newton–Schulz operand dtype for ``norm`` on ``device``: ``ns_dtype`` if given,
        else the backend's default (the first of its ``compute_dtypes``)."""
        return norm.ns_dtype or self.capabilities.compute_dtypes[0]

    def refusal(
        self,
        norm: Norm,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        buffer_dtype: torch.dtype | None = None,
        capturable: bool = False,
    ) -> str | None:
        """What the kernels do not take about a parameter of ``shape`` and ``dtype`` on
        ``device`` under ``norm`` (``Auto`` is resolved first), with its averaging buffer in
        ``buffer_dtype`` (``None``: the gradient's), for a ``capturable`` optimizer or not, as a
        phrase that follows "does not take", or ``None`` if they take it. Reads the
        capabilities and the norm's layout only, never data. (Whether the kernels run on
        ``device`` at all is :meth:`unavailable_reason`.)"""
        caps, picked = self.capabilities, norm.pick(shape)
        if capturable and not caps.capturable:
            return "capturable steps"
        if "*" not in caps.norms and picked.name not in caps.norms:
            return f"the {picked.name} norm"
        for what, t in (("parameters", dtype), ("buffers", buffer_dtype)):
            if t is not None and t not in caps.tensor_dtypes:
                return f"{str(t).removeprefix('torch.')} {what}"
        if isinstance(picked, Spectral):
            if picked.polar not in caps.polars:
                return f"polar={picked.polar!r}"
            compute = self.compute_dtype(picked, device)
            if compute not in caps.compute_dtypes:
                return f"ns_dtype={str(compute).removeprefix('torch.')}"
            if picked.precondition is not None:
                return f"{picked.precondition.upper()} preconditioning ({picked.coefficients!r})"
            if caps.max_steps is not None and len(picked.table) > caps.max_steps:
                return f"{len(picked.table)} Newton–Schulz steps (at most {caps.max_steps})"
            if caps.reshapes_only and not picked.plain_reshape():
                return "matrices that are not a reshape of the parameter (split blocks)"
            return None
        if caps.reshapes_only and picked.group_spec(shape) is None:
            return "groups that are not a reshape of the parameter"
        return None

    def takes(self, *args: Any, **kwargs: Any) -> bool:
        """Whether the kernels take such a parameter: :meth:`refusal`'s arguments, and it
        returns ``None``."""
        return self.refusal(*args, **kwargs) is None

    # The kernels behind the package's ops (arguments: :class:`.ops.NSStep`,
    # :class:`.ops.GroupedStep`); called by the plan in eager mode and by the ops while
    # ``torch.compile`` traces.
    def ns_step_(self, *args: Any) -> None:
        raise NotImplementedError(f"{self!r} has no Newton–Schulz step kernels")

    def grouped_step_(self, *args: Any) -> None:
        raise NotImplementedError(f"{self!r} has no grouped-norm step kernels")

    def polar_(
        self, G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool = False
    ) -> Tensor:
        raise NotImplementedError(f"{self!r} has no polar kernels")
