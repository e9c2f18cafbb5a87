"""scion_kernels: the Scion optimizer (Pethick et al., 2025) for PyTorch.

The pure-PyTorch implementation here is the definition every fast backend is tested against::

    from scion_kernels import Scion, param_groups
    opt = Scion(param_groups(model, recipe="gpt"), lr=2**-12, momentum=0.1)
"""

from .backends import native_available
from .groups import RECIPES, Recipe, Role, format_groups, param_groups
from .monitor import NormMonitor
from .newton_schulz import (
    COEFFICIENTS,
    cans_coefficients,
    newton_schulz,
    polar_svd,
    resolve_coefficients,
)
from .norms import (
    NORMS,
    Auto,
    BiasRMS,
    ColNorm,
    Norm,
    RowNorm,
    Sign,
    Spectral,
    SpectralConv,
    make_norm,
)
from .optim import Scion, ScionLight

__version__ = "0.1.0"

__all__ = [
    "COEFFICIENTS",
    "NORMS",
    "RECIPES",
    "Auto",
    "BiasRMS",
    "ColNorm",
    "Norm",
    "NormMonitor",
    "Recipe",
    "Role",
    "RowNorm",
    "Scion",
    "ScionLight",
    "Sign",
    "Spectral",
    "SpectralConv",
    "__version__",
    "cans_coefficients",
    "format_groups",
    "make_norm",
    "native_available",
    "newton_schulz",
    "param_groups",
    "polar_svd",
    "resolve_coefficients",
]
