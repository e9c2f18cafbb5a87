"""The Triton backend (``backend="triton"``): its capabilities, its policy per GPU architecture,
and the object that runs its kernels (:mod:`.newton_schulz`, :mod:`.grouped`).

Nothing here imports Triton: the kernels are imported the first time a step runs them.
Without Triton the package still works on the reference path, and :func:`unavailable_reason`
says why the kernels cannot run. On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..base import Backend, Capabilities, below_floor, capability, for_arch

__all__ = [
    "APPLY_TMA", "INTERPRETER", "POLICIES", "Policy", "SYRK_TMA", "TritonBackend", "available",
    "interpreting", "on_device", "unavailable_reason",
]  # fmt: skip

#: Tile configurations of the tiled kernels, the default first: ``X·Xᵀ`` and ``b·A + c·A·A``
#: take the ``syrk`` ones (each timed separately: their inner dimensions differ), ``a·X + B·X``
#: the ``apply`` ones.
_SYRK = (
    dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=4),
    dict(BLOCK=128, BLOCK_K=128, num_warps=8, num_stages=2),
    dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK=64, BLOCK_K=32, num_warps=4, num_stages=4),
)
_APPLY = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
)
#: Hopper's further ``syrk`` candidates: the persistent kernel reading through TMA descriptors.
SYRK_TMA = (
    dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3, TMA=1),
    dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=4, TMA=1),
)
#: Hopper's further ``apply`` candidates: the persistent kernel reading through TMA
#: descriptors (``TMA``), with grouped tiles (``GROUP_M`` row tiles share their columns in L2).
#: Timed by ``bench.tiles`` and by autotuning; not the default before a GPU run says so.
#: Shared memory for sm_90a (bench/compile_report.py): 208 KiB, 160 KiB, 208 KiB of the 227
#: a block may have (a 4-stage 128×256 needs 256).
APPLY_TMA = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=1),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, TMA=1),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=3, TMA=1),
)


@dataclass(frozen=True)
class Policy:
    """How the kernels launch on one architecture."""

    #: Candidate tile configurations (the default first), see ``_SYRK`` and ``_APPLY``.
    syrk: tuple[dict[str, int], ...] = _SYRK
    apply: tuple[dict[str, int], ...] = _APPLY
    #: Buckets whose padded matrix has at most ``small_limit`` elements and ``small_rows``
    #: rows run the whole step in one program per matrix; larger ones the tiled kernels (0:
    #: always tiled, how tests check the tiled kernels on small shapes).
    small_limit: int = 8192
    small_rows: int = 64
    #: Tile of the averaging and normalizing passes; rows per program of the grouped norms'
    #: kernel (Sign, the ℓ2 norms) and its group chunk (grouped, whole tensor).
    prologue_tile: int = 64
    grouped_rows: tuple[int, int] = (8, 4)
    grouped_chunk: tuple[int, int] = (256, 1024)
    #: Time the candidate tiles the first time a bucket shape is seen and keep the fastest
    #: (``None``: when ``SCION_KERNELS_AUTOTUNE=1`` is set at that time). Off by default:
    #: tile shapes change the order of the sums, and a choice made by timing can differ
    #: between runs and between the ranks of a distributed job, whose parameters would then
    #: drift apart bit by bit.
    autotune: bool | None = None
    #: Fill every work buffer with NaN before the kernels write it (tests: proves every
    #: element is written).
    poison: bool = False


#: The policy per compute capability (the newest the device has is used). A new architecture
#: adds its entry here.
POLICIES: dict[tuple[int, int], Policy] = {
    (8, 0): Policy(),
    (9, 0): Policy(syrk=_SYRK + SYRK_TMA, apply=_APPLY + APPLY_TMA),
}
#: In Triton's interpreter: small tiles keep it fast (``tl.dot`` needs at least 16).
INTERPRETER = Policy(
    syrk=(dict(BLOCK=16, BLOCK_K=16, num_warps=4, num_stages=1),),
    apply=(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1),),
    prologue_tile=16,
    grouped_rows=(4, 4),
    grouped_chunk=(32, 32),
    autotune=False,
)


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or ``None`` if they can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton is a dependency here
        return f"Triton is not installed ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (
        f"the Triton kernels run on CUDA tensors (got a {device.type} tensor); on CPU they run "
        "only in Triton's interpreter (TRITON_INTERPRET=1), which is meant for testing"
    )


def available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernels can run on ``device``."""
    return unavailable_reason(torch.device(device)) is None


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while kernels launch: Triton launches on the current CUDA
    device and its current stream, whatever device the tensors are on (parameters on
    ``cuda:1`` with ``cuda:0`` current would fault or read across devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(Backend):
    """The Triton kernels: every norm's whole step on CUDA GPUs of compute capability 8.0 and
    up (and on the CPU in Triton's interpreter), Newton–Schulz in bf16 or fp16.

    ``policies``: the launch policy per architecture (default :data:`POLICIES`; the
    interpreter always runs ``interpreter``, default :data:`INTERPRETER`).
    """

    name = "triton"
    capabilities = Capabilities(
        devices=("cuda", "cpu"), polars=("newton_schulz", "gram"), capturable=True
    )

    def __init__(
        self,
        policies: dict[tuple[int, int], Policy] | None = None,
        interpreter: Policy | None = None,
    ) -> None:
        self.policies = POLICIES if policies is None else policies
        self.interpreter = INTERPRETER if interpreter is None else interpreter

    def with_policy(self, **changes: Any) -> TritonBackend:
        """This backend with ``changes`` made to every policy (e.g. ``small_limit=0``)."""
        other = copy.copy(self)
        other.policies = {a: dataclasses.replace(p, **changes) for a, p in self.policies.items()}
        other.interpreter = dataclasses.replace(self.interpreter, **changes)
        return other

    def policy(self, device: torch.device) -> Policy:
        """The launch policy on ``device``."""
        arch = capability(device)
        return self.interpreter if arch is None else for_arch(self.policies, arch)

    def unavailable_reason(self, device: torch.device) -> str | None:
        return (
            super().unavailable_reason(device)
            or unavailable_reason(device)
            or below_floor(self, device)
        )

    def ns_step_(self, *args: Any) -> None:
        from .newton_schulz import ns_step_

        ns_step_(self.policy(args[0][0].device) if args[0] else self.interpreter, *args)

    def grouped_step_(self, *args: Any) -> None:
        from .grouped import grouped_step_

        grouped_step_(self.policy(args[0][0].device) if args[0] else self.interpreter, *args)

    def polar_(
        self, G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool = False
    ) -> Tensor:
        from .newton_schulz import polar_

        return polar_(self.policy(G.device), G, coefficients, dtype, gram)
