"""The native CUDA C++ backend (``backend="cuda"``, module ``scion_kernels._C`` built from
``csrc/``): its capabilities, the architectures it is compiled for, its policy per
architecture, and the object that runs its kernels (:mod:`.native`).

Nothing here imports the native module: it is imported the first time a route or a step
asks for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..base import Backend, Capabilities, below_floor, capability, for_arch

__all__ = ["ARCHS", "POLICIES", "NativeBackend", "Policy"]

#: The architectures the native module is compiled for by default, in CMake's
#: ``CUDA_ARCHITECTURES`` form (``SCION_CUDA_ARCHS`` overrides it at build time; setup.py reads
#: this line). ``90a``: Hopper's architecture-specific features.
ARCHS = "80;90a"


@dataclass(frozen=True)
class Policy:
    """How the native kernels launch on one architecture."""

    #: The product tile: 64 or 128 forces it; 0 lets the C++ plan choose by matrix size
    #: (``csrc/ns_plan.cu``).
    tile: int = 0
    #: The tiled products on Hopper's ``wgmma`` fed by TMA (``csrc/ns_wgmma.cuh``, the 128 tile;
    #: the module's ``90a`` image, so only a compute capability 9.0 entry may set it): 0 (or
    #: false) keeps ``mma.sync``; 1 (or true) reads ``a·X + B·X``'s Xᵀ from registers; 2 reads
    #: its X from shared memory, so its products overlap; 3 does so on 128×256 tiles
    #: (``m64n256k16``); 4 also runs the symmetric products on 128×256 tiles.
    wgmma: int = 0
    #: With ``wgmma``: launch the products one block per multiprocessor, each walking the
    #: output tiles in turn, its producer warpgroup loading the next tile while its consumers
    #: store the last one (false: one block per tile).
    persistent: bool = False


#: The policy per compute capability (the newest the device has is used). A new architecture
#: adds its entry here and its code to ``ARCHS``.
POLICIES: dict[tuple[int, int], Policy] = {(8, 0): Policy()}


class NativeBackend(Backend):
    """The native kernels: every norm's whole step on CUDA GPUs of compute capability 8.0 and
    up (``csrc/device.cuh``), Newton–Schulz in bf16 or fp16 with at most 16 steps
    (``kMaxSteps``, ``csrc/ns_plan.cuh``).

    ``module``: the native module to run (default: the built ``scion_kernels._C``; the test
    suite passes its host emulation, which also runs on CPU tensors, so its ``devices`` then
    include ``"cpu"``). ``policies``: the launch policy per architecture (default
    :data:`POLICIES`).
    """

    name = "cuda"
    capabilities = Capabilities(
        devices=("cuda",), polars=("newton_schulz", "gram"), max_steps=16, capturable=True
    )

    def __init__(
        self,
        module: ModuleType | None = None,
        policies: dict[tuple[int, int], Policy] | None = None,
    ) -> None:
        self._module = module
        self.policies = POLICIES if policies is None else policies
        if getattr(module, "EMULATED", False):  # the host emulation runs on CPU tensors
            self.capabilities = dataclasses.replace(self.capabilities, devices=("cuda", "cpu"))

    @property
    def module(self) -> ModuleType | None:
        """The native module the kernels run from, or ``None`` where it was not built."""
        if self._module is not None:
            return self._module
        from .native import import_native

        return import_native()

    def policy(self, device: torch.device) -> Policy:
        """The launch policy on ``device`` (the floor's on a CPU: the host emulation)."""
        arch = capability(device)
        return self.policies[min(self.policies)] if arch is None else for_arch(self.policies, arch)

    def unavailable_reason(self, device: torch.device) -> str | None:
        from .native import unavailable_reason

        return (
            super().unavailable_reason(device)
            or unavailable_reason(self.module)
            or below_floor(self, device)
        )

    def ns_step_(self, *args: Any) -> None:
        from .native import ns_step_

        policy = self.policy(args[0][0].device) if args[0] else Policy()
        ns_step_(self.module, policy.tile, *args, wgmma=policy.wgmma, persistent=policy.persistent)

    def grouped_step_(self, *args: Any) -> None:
        from .native import grouped_step_

        grouped_step_(self.module, *args)

    def polar_(
        self, G: Tensor, coefficients: list[float], dtype: torch.dtype, gram: bool = False
    ) -> Tensor:
        from .native import polar_

        policy = self.policy(G.device)
        return polar_(
            self.module, policy.tile, G, coefficients, dtype, gram, policy.wgmma,
            policy.persistent,
        )  # fmt: skip
