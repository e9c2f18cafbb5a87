"""The reference backend (``backend="torch"``): the pure-PyTorch LMOs of
:mod:`scion_kernels.norms`, which define the step. Every norm, every layout, any device; the
optimizer runs it itself (averaging, :meth:`~scion_kernels.norms.Norm.lmo_many`, update), so
this object only answers the questions a route asks."""

from __future__ import annotations

import torch

from ...norms import POLARS, Spectral
from ..base import Backend, Capabilities

__all__ = ["Reference"]


class Reference(Backend):
    """The pure-PyTorch reference: takes every parameter on every device."""

    name = "torch"
    capabilities = Capabilities(
        devices=("*",),
        norms=("*",),
        tensor_dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
        compute_dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64),
        polars=POLARS,
        reshapes_only=False,
        capturable=True,
    )
    fused = False

    def compute_dtype(self, norm: Spectral, device: torch.device) -> torch.dtype:
        """``ns_dtype``, or the device's default (bf16, or float32 on a CPU without bf16
        matrix instructions: :meth:`Spectral.compute_dtype`)."""
        return norm.compute_dtype(device)
