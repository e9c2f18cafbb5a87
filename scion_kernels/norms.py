"""The norms Scion constrains each layer with: their LMO and their initialization.

A weight ``g`` of shape ``(d_out, d_in)`` (a ``nn.Linear`` weight); ``ε = 1e-8`` by default.

============  ==========================================================================
norm          ``lmo(g)`` (gradient-aligned; the optimizer subtracts ``γ·ρ·lmo(d)``)
============  ==========================================================================
Spectral      ``s·polar(g)``, ``s = √(d_out/d_in)`` (``normalized=False``: ``√d_out``;
              ``max=True``: ``max(1, s)``); ``split``: per block of rows
SpectralConv  ``polar(g.reshape(d_out, -1))·√(d_out/d_in)/K``, ``K`` = kernel elements;
              ``groups``: per group of channels
Sign          ``sign(g)/d_in`` (``normalized=False``: ``sign(g)``)
ColNorm       ``g[:, j] / (‖g[:, j]‖₂/√d_out + ε)``, ``normalized``: also ``/ d_in``
RowNorm       ``g[i, :] / (‖g[i, :]‖₂·√d_in + ε)`` (``normalized=False``: no ``√d_in``)
BiasRMS       ``g / (RMS(g) + ε)``, the RMS over all elements
Auto          ndim ≥ 3 → SpectralConv, 2 → Spectral, 0 or 1 → BiasRMS
============  ==========================================================================

``polar(g) = U·Vᵀ`` is computed by Newton–Schulz (:func:`~scion_kernels.newton_schulz`) or,
with ``polar="svd"``, exactly. Every LMO is returned in float32 (float64 when the input is
float64 or the polar factor is computed in float64) and maps a zero gradient to zero.

Each norm's ``init`` puts a weight on the unit sphere of that norm (the optimizer's ``init()``
then multiplies by the radius ρ), as the authors do: orthogonal (times ``s``) for the spectral
norms, random signs for Sign, Gaussian normalized like the LMO for ColNorm and RowNorm, zeros for
BiasRMS. Inside :func:`shared_draws` the orthogonal matrices of one shape are signed row
permutations of one draw (each still Haar-distributed; one QR per shape instead of per matrix).

How a weight is stored is an option of its norm, so the LMO, its scale and ``init`` all read
the true ``(d_out, d_in)``: ``transpose=True`` for a weight stored ``(d_in, d_out)`` (HF's GPT-2
``Conv1D``, an embedding ``(vocab, dim)`` seen as a map from one-hot tokens), ``batch_dims`` for
stacked matrices (MoE experts ``(E, d_out, d_in)``), ``split`` for fused projections (Q, K, V
or gates stacked along ``d_out``), ``groups`` and ``transpose`` for grouped, depthwise and
transposed convolutions. :func:`scion_kernels.param_groups` sets them from the module types.

Differences from the authors' ``scion.py``, all deliberate: BiasRMS reduces over all elements
(theirs reduces over dim 0, which turns an ``(1, N, D)`` position embedding into a sign);
``SpectralConv`` handles Conv1d (and Conv3d) in ``init``; ``Auto`` passes options through; the
polar factor is normalized without an ε floor (tiny gradients still give a unit-norm
direction); matrix norms take stacked weights ``(E, d_out, d_in)`` with ``batch_dims=1``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._util import eager_cache
from .newton_schulz import (
    aol_,
    default_compute_dtype,
    gram_iterate,
    iterate,
    normalized_stack,
    orient,
    polar_svd,
    preconditioning,
    resolve_coefficients,
    stacks_well,
    uses_gram,
)

__all__ = [
    "NORMS",
    "Auto",
    "BiasRMS",
    "GroupSpec",
    "ColNorm",
    "Norm",
    "RowNorm",
    "Sign",
    "Spectral",
    "SpectralConv",
    "make_norm",
    "norms_that_fit",
    "random_orthogonal",
    "shared_draws",
]

_EPS = 1e-8


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_batch_dims(batch_dims: int) -> int:
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(f"batch_dims must be a non-negative integer; got {batch_dims!r}")
    return batch_dims


def _check_split(split: Sequence[int] | None) -> tuple[int, ...] | None:
    if split is None:
        return None
    if not isinstance(split, (list, tuple)) or not split:
        raise ValueError(f"split must be None or a sequence of positive ints; got {split!r}")
    return tuple(_check_positive(k, "each split size") for k in split)


def _check_positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer; got {value!r}")
    return value


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0.0 < eps < math.inf):
        raise ValueError(f"eps must be a finite positive number; got {eps!r}")
    return float(eps)


def _group_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


def _stacked_apply(
    mats: Sequence[Tensor],
    fn: Callable[[list[Tensor]], Tensor],
    alone: Callable[[Tensor], bool] | None = None,
) -> list[Tensor]:
    """Group the ``(B_i, r, c)`` tensors by shape; ``fn`` maps one group (a list) to the stacked
    result ``(ΣB_i, r', c')``, which is split back. One ``fn`` call per shape, and one per
    tensor for which ``alone`` is true."""
    out: list[Tensor | None] = [None] * len(mats)
    keys = [
        (m.device, m.dtype, tuple(m.shape[1:]), i if alone is not None and alone(m) else -1)
        for i, m in enumerate(mats)
    ]
    for idx in _group_by(keys).values():
        res = fn([mats[i] for i in idx])
        for i, piece in zip(idx, res.split([mats[i].shape[0] for i in idx]), strict=True):
            out[i] = piece
    return out  # type: ignore[return-value]


def _cat(mats: list[Tensor]) -> Tensor:
    return mats[0] if len(mats) == 1 else torch.cat(mats)


class GroupSpec(NamedTuple):
    """How a grouped LMO (Sign, ColNorm, RowNorm, BiasRMS) acts on a tensor, in the form the
    fused kernels run: the tensor is seen as ``matrices`` ``(B, r, c)`` (as stored), its groups
    are their rows, or their columns when ``columns``, or the whole tensor when ``whole``; for
    every group ``v``::

        u = v / (‖v‖₂·q + ε)      (ColNorm, RowNorm, BiasRMS)
        u = sign(v)·q             (Sign: ``sign``, ε = 0)
    """

    matrices: tuple[int, int, int]
    columns: bool
    whole: bool
    sign: bool
    q: float
    eps: float


def _group_dim(spec: GroupSpec) -> int:
    """The dim of ``spec``'s matrices that its groups run along (a column runs down its rows)."""
    return -2 if spec.columns else -1


def _grouped_lmo(m: Tensor, spec: GroupSpec, norms: Tensor | None = None) -> Tensor:
    """The grouped LMO :class:`GroupSpec` describes, on ``m`` seen as its matrices: ``sign(v)·q``,
    or ``v/(‖v‖₂·q + ε)`` per group with the groups' ℓ2 norms ``norms`` (``keepdim`` along
    the groups' dim; computed from ``m`` when not given)."""
    if spec.sign:
        return torch.sign(m).mul_(spec.q)
    if norms is None:
        norms = torch.linalg.vector_norm(m, dim=_group_dim(spec), keepdim=True)
    return m / (norms * spec.q + spec.eps)


def init_dtype(w: Tensor) -> torch.dtype:
    """The dtype an init computes in for a parameter ``w``: float64 for float64, else float32
    (rounded once to ``w``'s dtype when copied in)."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


#: The one draw per ``(rows, columns, device, dtype)`` of the enclosing :func:`shared_draws`
#: block, or ``None`` outside one (every draw independent).
_SHARED: ContextVar[dict[tuple, Tensor] | None] = ContextVar("scion_shared_draws", default=None)


@contextlib.contextmanager
def shared_draws() -> Iterator[None]:
    """Within this block, :func:`random_orthogonal` draws one Haar matrix per shape, device and
    dtype (a matrix and its transpose share one), and returns copies of it, each with its rows
    randomly permuted and the signs of its rows and columns flipped at random.

    Each matrix is still exactly Haar-distributed on its own (the Haar measure is invariant
    under signed permutations on either side); matrices of one shape are no longer independent
    of each other. The QR, the cost of a draw (``O(mn²)``), is paid once per shape instead of
    once per matrix; what is left is memory traffic.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def random_orthogonal(
    shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """A stack of random matrices of ``shape`` ``(..., r, c)`` with orthonormal rows (r ≤ c) or
    columns, drawn from the Haar measure as ``torch.nn.init.orthogonal_`` draws them (the Q of
    a Gaussian's QR, its columns' signs fixed by R's diagonal), all at once on ``device``, times
    ``scale``. Inside :func:`shared_draws`, signed permutations of one draw per shape instead.
    ``out``: a contiguous tensor of ``shape`` and ``dtype`` to write them into (returned)."""
    *batch, r, c = shape
    shared = _SHARED.get()
    if shared is None:
        q = _haar(r, c, batch, device, dtype)
        if out is None:
            return q.mul_(scale) if scale != 1.0 else q
        return torch.mul(q, scale, out=out) if scale != 1.0 else out.copy_(q)
    key = (r, c, torch.device(device), dtype)
    if key not in shared:
        turned = shared.get((c, r, *key[2:]))  # the other orientation's draw serves as well
        q = _haar(r, c, [], device, dtype) if turned is None else turned.mT
        shared[key] = q.contiguous()  # LAPACK's Q is column-major: rows are gathered below
    copies = _signed_permutations(shared[key], math.prod(batch), scale, out)
    return copies.view(*batch, r, c)


def _haar(
    r: int, c: int, batch: Sequence[int], device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Haar-distributed ``(*batch, r, c)`` matrices with orthonormal rows or columns."""
    g = torch.randn((*batch, max(r, c), min(r, c)), device=device, dtype=dtype)
    q, rr = torch.linalg.qr(g)
    q = q * torch.sgn(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q if r >= c else q.mT.contiguous()


def _signed_permutations(q: Tensor, count: int, scale: float, out: Tensor | None) -> Tensor:
    """``count`` copies of ``scale·q`` (``q``: ``(m, n)``), each ``D₁P·q·D₂`` with a fresh
    random row permutation ``P`` and random signs ``D`` on both sides: ``(count, m, n)``, into
    ``out`` if given. (Rows are whole-row copies; a column permutation as well would cost a
    strided gather, and the column signs already decorrelate the copies.)"""
    m, n = q.shape
    rows = torch.rand(count, m, device=q.device).argsort(-1).flatten()
    flat = None if out is None else out.view(count * m, n)
    copies = torch.index_select(q, 0, rows, out=flat).view(count, m, n)
    row_factors = torch.randint(0, 2, (count, m, 1), device=q.device, dtype=q.dtype)
    col_signs = torch.randint(0, 2, (count, 1, n), device=q.device, dtype=q.dtype) * 2 - 1
    return copies.mul_(row_factors.mul_(2 * scale).sub_(scale)).mul_(col_signs)


class Norm:
    """A norm for one family of tensors: its LMO, its unit-sphere init, the shapes it fits.

    Subclasses implement :meth:`lmo_many` (batched over a list of tensors), :meth:`init` and
    :meth:`fits`. Options are constructor keywords (the optimizer's ``norm_kwargs``), fixed
    once the norm is made: an optimizer's routes and a norm's per-shape layouts rely on it, so
    to change an option make a new norm (or change ``norm_kwargs``).
    """

    name: ClassVar[str]

    def fits(self, shape: Sequence[int]) -> str | None:
        """``None`` if this norm applies to a tensor of ``shape``, else what it needs instead."""
        raise NotImplementedError

    def pick(self, shape: Sequence[int]) -> Norm:
        """The norm used for a tensor of ``shape``: this one (``Auto`` chooses by shape)."""
        return self

    def lmo(self, g: Tensor) -> Tensor:
        """``lmo(g)`` of one tensor, in float32 (float64 for float64 input), shape of ``g``."""
        return self.lmo_many([g])[0]

    def lmo_many(self, gs: Sequence[Tensor]) -> list[Tensor]:
        """``[lmo(g) for g in gs]``, batched across tensors where the norm allows it."""
        raise NotImplementedError

    def init(self, w: Tensor) -> Tensor:
        """Overwrite ``w`` in place with a point on this norm's unit sphere; return ``w``."""
        raise NotImplementedError

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``lmo(g)`` for a ``g`` of ``dtype``: float64 for float64, else float32
        (float64 too where a norm computes in it, e.g. ``Spectral(polar="svd")``)."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def group_spec(self, shape: Sequence[int]) -> GroupSpec | None:
        """For an LMO that acts on independent groups of elements (Sign, ColNorm, RowNorm,
        BiasRMS), how it acts on a tensor of ``shape`` (:class:`GroupSpec`); else ``None``."""
        return None

    def partial_sums(self, d: Tensor) -> Tensor | None:
        """A grouped LMO's per-group sums of squares of ``d`` in float64 (``keepdim`` shape, as
        :meth:`lmo_from_sums` takes them), or ``None`` when it needs none (Sign). Summed over
        the pieces of a tensor split across ranks, they are the whole tensor's."""
        raise NotImplementedError(f"{self.name} is not a grouped norm")

    def lmo_from_sums(self, d: Tensor, sums: Tensor | None, shape: Sequence[int]) -> Tensor:
        """``lmo`` of a tensor of ``shape`` on the piece ``d`` of it, given the whole tensor's
        :meth:`partial_sums` of the groups ``d`` holds (every group of ``d`` has the
        ``sums`` it would have in the whole tensor). With ``d`` whole and its own sums this is
        :meth:`lmo` up to rounding."""
        raise NotImplementedError(f"{self.name} is not a grouped norm")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _kept(self, table: str, keys: Sequence[Any], make: Callable[[Any], Any]) -> list[Any]:
        """``[make(key) for key in keys]``, each kept on this norm in its ``table`` (a norm's
        options are fixed once made, so what they give per shape is too); made afresh while
        ``torch.compile`` traces (it evaluates them once per graph anyway)."""
        if torch.compiler.is_compiling():
            return [make(key) for key in keys]
        kept: dict[Any, Any] = self.__dict__.setdefault(table, {})
        out = []
        for key in keys:
            value = kept.get(key)
            if value is None:
                value = kept[key] = make(key)
            out.append(value)
        return out

    def spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, options)``, plain data from which :func:`make_norm` rebuilds this norm:
        what an optimizer's param group stores (so its ``state_dict`` loads with
        ``torch.load(weights_only=True)``). Options at their defaults are left out, so equal
        configurations give equal specs."""
        params = inspect.signature(type(self).__init__).parameters
        empty = inspect.Parameter.empty
        options = {
            k: v
            for k, v in self._options().items()
            if k not in params or params[k].default is empty or v != params[k].default
        }
        return self.name, options

    def _options(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}


class _MatrixNorm(Norm):
    """A norm on matrices ``(..., d_out, d_in)`` with ``batch_dims`` leading batch dims."""

    batch_dims: int

    def fits(self, shape: Sequence[int]) -> str | None:
        want = 2 + self.batch_dims
        if len(shape) == want:
            return None
        if self.batch_dims:
            return f"needs a {want}-D tensor ({self.batch_dims} batch dims, d_out, d_in)"
        return "needs a 2-D weight (d_out, d_in)"

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The batch of matrices ``(B, rows, cols)`` a tensor of ``shape`` is seen as, rows and
        columns as stored (:meth:`dims` gives the true ``(d_out, d_in)``)."""
        return math.prod(shape[:-2]), shape[-2], shape[-1]

    def _matrices(self, g: Tensor) -> Tensor:
        """``g`` as a batch of matrices ``(B, r, c)`` as stored (a view when possible)."""
        return g.reshape(self.matrix_shape(g.shape))

    def dims(self, shape: Sequence[int]) -> tuple[int, int]:
        """The true ``(d_out, d_in)`` of one matrix of a tensor of ``shape`` (``transpose``:
        stored ``(d_in, d_out)``)."""
        r, c = self.matrix_shape(shape)[1:]
        return (c, r) if getattr(self, "transpose", False) else (r, c)

    def _init_in_place(self, w: Tensor) -> Tensor | None:
        """``w``'s matrices ``(B, r, c)`` as a contiguous view an init can draw straight into
        (``w`` already in :func:`init_dtype`), or ``None`` (draw aside, then copy)."""
        mats = self._matrices(w)
        if mats.is_contiguous() and mats.data_ptr() == w.data_ptr() and w.dtype == init_dtype(w):
            return mats
        return None


#: How :class:`Spectral` computes the polar factor (its ``polar`` option).
POLARS = ("newton_schulz", "gram", "svd")


class Spectral(_MatrixNorm):
    """The RMS→RMS operator norm: ``lmo(g) = s·polar(g)``, ``s = √(d_out/d_in)``.

    Args:
        max: use ``s = max(1, s)`` (the authors' choice for an input layer).
        normalized: ``s = √(d_out/d_in)``; ``False`` gives ``s = √d_out``.
        steps: Newton–Schulz steps (default: 5 for a named set of one triple, else the
            number of triples).
        coefficients: a preset of :data:`~scion_kernels.COEFFICIENTS` (``"classic"``,
            ``"polar_express"``, ``"you"``, ``"deepseek_v4"``, ``"turbo_muon"``: AOL
            preconditioning, the reference only; ``"cubic"``, ``"cans"``, ``"cans_cubic"``),
            or a sequence of ``(a, b, c)``.
        ns_dtype: Newton–Schulz operand dtype: bf16, fp16, float32 or float64; ``None``
            (default) picks per device (:meth:`compute_dtype`): bf16 on GPUs and on CPUs with
            bf16 matrix instructions (AVX512-BF16, AMX), float32 on other CPUs.
        polar: ``"newton_schulz"`` (default); ``"gram"``: the same steps computed on the Gram
            matrix for matrices at least twice as wide as tall (either way round), in fewer
            flops and with a larger rounding error
            (:func:`~scion_kernels.newton_schulz.gram_iterate`; not with coefficients whose
            terms cancel too much for the compute dtype, e.g. Polar Express in bf16:
            :func:`~scion_kernels.newton_schulz.gram_refusal`; the reference and the
            Triton and CUDA kernels); or ``"svd"``: the exact
            ``U·Vᵀ`` in float64, for validation (slow).
        batch_dims: leading dims that index independent matrices, e.g. ``1`` for stacked expert
            weights ``(E, d_out, d_in)``: each matrix is orthogonalized and scaled on its own.
        transpose: the weight is stored ``(d_in, d_out)`` (HF GPT-2's ``Conv1D``): ``s`` reads
            the true dims (``polar`` commutes with the transpose).
        split: sizes along ``d_out`` of blocks orthogonalized and scaled on their own, e.g.
            ``(d, d, d)`` for a fused Q, K, V projection ``(3d, d_in)``; each block gets
            ``√(size/d_in)·polar(block)``.

    Attributes:
        table: the ``(a, b, c)`` of each Newton–Schulz step, resolved from ``coefficients`` and
            ``steps`` (what every backend iterates).
    """

    name = "Spectral"

    def __init__(
        self,
        max: bool = False,  # noqa: A002 - the authors' option name
        normalized: bool = True,
        steps: int | None = None,
        coefficients: str | Sequence[Sequence[float]] = "classic",
        ns_dtype: torch.dtype | None = None,
        polar: str = "newton_schulz",
        batch_dims: int = 0,
        transpose: bool = False,
        split: Sequence[int] | None = None,
    ) -> None:
        self.max = bool(max)
        self.transpose = bool(transpose)
        self.split = _check_split(split)
        self.normalized = bool(normalized)
        self.steps = steps
        self.coefficients = coefficients
        self.ns_dtype = ns_dtype
        self.polar = polar
        self.batch_dims = _check_batch_dims(batch_dims)
        if polar not in POLARS:
            raise ValueError(f"polar must be one of {', '.join(map(repr, POLARS))}; got {polar!r}")
        if ns_dtype not in (None, torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(
                "ns_dtype must be None (chosen per device), torch.bfloat16, float16, float32 or "
                f"float64; got {ns_dtype!r}"
            )
        self.table = resolve_coefficients(coefficients, steps)
        #: What Newton–Schulz starts from besides ``G/‖G‖_F`` (``"aol"`` for
        #: ``"turbo_muon"``), or ``None``.
        self.precondition = preconditioning(coefficients)

    def fits(self, shape: Sequence[int]) -> str | None:
        reason = super().fits(shape)
        if reason is None and self.split is not None:
            d_out = self.dims(shape)[0]
            if sum(self.split) != d_out:
                return f"has split {list(self.split)}, which does not sum to d_out = {d_out}"
        return reason

    def scale_for(self, shape: Sequence[int]) -> float:
        """The factor ``s`` of ``lmo = s·polar`` for a tensor (or ``split`` block) of ``shape``."""
        d_out, d_in = self.dims(shape)
        s = math.sqrt(d_out / d_in) if self.normalized else math.sqrt(d_out)
        return max(1.0, s) if self.max else s

    def _blocks(self, mats: Tensor) -> list[Tensor]:
        """The independent matrices ``(B, r_i, c_i)`` of ``mats`` ``(B, r, c)``: itself, or its
        ``split`` blocks along ``d_out`` (views)."""
        if self.split is None:
            return [mats]
        return list(mats.split(list(self.split), dim=-1 if self.transpose else -2))

    def block_shapes(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """The ``(rows, cols)`` of the independent matrices of a tensor of ``shape``, as stored:
        its matrices', or each ``split`` block's."""
        _, rows, cols = self.matrix_shape(shape)
        if self.split is None:
            return [(rows, cols)]
        return [(rows, s) if self.transpose else (s, cols) for s in self.split]

    def plain_reshape(self) -> bool:
        """Whether the matrices are a plain reshape of the stored tensor, all scaled by
        ``scale_for(shape)`` (the layouts the fused kernels take)."""
        return self.split is None

    def _block_scale(self, block: Tensor, shape: Sequence[int]) -> float:
        """``s`` for one block (as :meth:`_blocks` gives) of a tensor of ``shape``."""
        return self.scale_for(shape if self.split is None else block.shape)

    def compute_dtype(self, device: torch.device | str) -> torch.dtype:
        """The Newton–Schulz operand dtype on ``device``: ``ns_dtype`` if given, else
        :func:`~scion_kernels.newton_schulz.default_compute_dtype` (bf16, or float32 on a CPU
        without bf16 matrix instructions)."""
        return self.ns_dtype or default_compute_dtype(device)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.polar == "svd" or self.ns_dtype == torch.float64:
            return torch.float64
        return super().update_dtype(dtype)

    def polar_factor(self, mats: list[Tensor]) -> Tensor:
        """``polar`` of wide matrices (each ``(B_i, m, n)``, ``m ≤ n``, one shape), stacked.

        Newton–Schulz normalizes each straight into one stack in the compute dtype, with no
        float32 copy of the whole group.
        """
        if self.polar == "svd":
            return polar_svd(_cat(mats))
        dtype = self.compute_dtype(mats[0].device)
        X = normalized_stack(mats, dtype)
        if self.precondition == "aol":
            return iterate(aol_(X), self.table)
        gram = self.runs_gram(*mats[0].shape[-2:], dtype)
        return (gram_iterate if gram else iterate)(X, self.table)

    def runs_gram(self, m: int, n: int, dtype: torch.dtype) -> bool:
        """Whether the polar factor of a wide ``m×n`` matrix (``m ≤ n``) is iterated in the Gram
        form in compute dtype ``dtype``: ``polar="gram"``, no preconditioning, and
        :func:`~scion_kernels.newton_schulz.uses_gram`."""
        return (
            self.polar == "gram"
            and self.precondition is None
            and uses_gram(m, n, self.table, dtype)
        )

    def _layout(self, where: tuple[torch.Size, torch.device]) -> list[tuple[bool, float, bool]]:
        """Per independent matrix of a tensor of shape ``where[0]`` on device ``where[1]``:
        whether it is tall (orthogonalized as its transpose), its factor ``s``, and whether it
        goes alone rather than in a stack (:func:`~scion_kernels.newton_schulz.stacks_well`)."""
        shape, device = where
        layout = []
        for rows, cols in self.block_shapes(shape):
            m, n, tall = orient(rows, cols)
            s = self.scale_for(shape if self.split is None else (rows, cols))
            layout.append((tall, s, not stacks_well(device, m, n)))
        return layout

    def _assemble(self, blocks: list[Tensor], shape: Sequence[int]) -> Tensor:
        """The inverse of :meth:`_blocks` after :meth:`_matrices`: a tensor of ``shape``."""
        mats = blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1 if self.transpose else -2)
        return mats.reshape(shape)

    def lmo_many(
        self, gs: Sequence[Tensor], polar: Callable[[Tensor], Tensor] | None = None
    ) -> list[Tensor]:
        """``[lmo(g) for g in gs]``; ``polar``, if given, computes the polar factor of a stack
        of wide matrices ``(B, m, n)`` (a backend's kernels) in place of :meth:`polar_factor`.

        Every matrix is oriented wide (``m ≤ n``), and all matrices of one oriented shape are
        orthogonalized by one call: a 3072×768 and a 768×3072 weight share a stack (on a CPU,
        large matrices go alone: see :func:`~scion_kernels.newton_schulz.stacks_well`). Within
        a stack the matrices are ordered by orientation and factor ``s``, so each run of equal
        ones is turned back, converted to the update dtype and scaled by one operation each.
        """
        factor = self.polar_factor if polar is None else (lambda mats: polar(_cat(mats)))
        blocks = [self._blocks(self._matrices(g)) for g in gs]
        layouts = self._kept("_layouts", [(g.shape, g.device) for g in gs], self._layout)
        # Per block: (its parameter, the block oriented wide, whether it was tall, its factor).
        entries: list[tuple[int, Tensor, bool, float]] = []
        stacks: dict[tuple, list[int]] = {}
        for j, (bs, layout) in enumerate(zip(blocks, layouts, strict=True)):
            for b, (tall, s, alone) in zip(bs, layout, strict=True):
                o = b.mT if tall else b
                k = len(entries)
                entries.append((j, o, tall, s))
                key = (o.device, o.dtype, *o.shape[1:], k if alone else -1)
                stacks.setdefault(key, []).append(k)
        results: list[Tensor | None] = [None] * len(entries)
        for members in stacks.values():
            members.sort(key=lambda k: entries[k][2:])  # stable: runs of (tall, factor)
            R = factor([entries[k][1] for k in members])
            dtype = self.update_dtype(gs[entries[members[0]][0]].dtype)
            start = 0
            for (tall, s), run in itertools.groupby(members, key=lambda k: entries[k][2:]):
                run = list(run)
                sizes = [entries[k][1].shape[0] for k in run]
                part = R[start : start + sum(sizes)]
                start += sum(sizes)
                # A tall matrix's factor is turned back into a contiguous copy, so the update
                # reads it in order (a strided add is ~4× slower). R is this call's own.
                part = (part.mT if tall else part).to(dtype, memory_format=torch.contiguous_format)
                part.mul_(s)
                for k, piece in zip(run, part.split(sizes), strict=True):
                    results[k] = piece
        out, k = [], 0
        for g, bs in zip(gs, blocks, strict=True):
            out.append(self._assemble(results[k : k + len(bs)], g.shape))  # type: ignore[arg-type]
            k += len(bs)
        return out

    def init(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            mats = self._init_in_place(w) if self.split is None else None
            if mats is not None:
                scale = self.scale_for(w.shape)
                random_orthogonal(mats.shape, w.device, w.dtype, scale=scale, out=mats)
                return w
            blocks = []
            for b in self._blocks(self._matrices(torch.empty(w.shape, device="meta"))):
                q = random_orthogonal(b.shape, w.device, init_dtype(w))
                blocks.append(q.mul_(self._block_scale(b, w.shape)))
            w.copy_(self._assemble(blocks, w.shape))
        return w


class SpectralConv(Spectral):
    """Spectral norm of a conv weight ``(d_out, d_in, *kernel)`` flattened to ``(d_out, -1)``.

    ``lmo(g) = polar(g.reshape(d_out, -1))·√(d_out/d_in)/K`` with ``K`` the number of kernel
    elements (``k`` for Conv1d, ``k²`` for a square Conv2d). Newton–Schulz options as
    :class:`Spectral`; the init is orthogonal per kernel tap, times the same factor.

    Args:
        groups: the conv's ``groups``: the weight ``(d_out, d_in/groups, *kernel)`` holds one
            matrix ``(d_out/groups, d_in/groups·K)`` per group, each orthogonalized and scaled
            on its own (a depthwise conv ``(C, 1, k, k)`` has ``C`` of them, ``1×k²``).
        transpose: a transposed conv's weight ``(d_in, d_out/groups, *kernel)``
            (``nn.ConvTranspose{1,2,3}d``): each group's matrix is
            ``(d_out/groups, d_in/groups·K)``, rows indexed by output channel.
        per_tap: one polar factor per kernel tap instead of one for the flattened kernel:
            ``lmo(g)[:, :, t] = polar(g[:, :, t])·√(d_out/d_in)/K`` for every tap ``t`` (and
            group): the LMO of ``K·maxₜ ‖W[:, :, t]‖_{RMS→RMS}``, the norm whose unit sphere
            :meth:`init` samples. Suits convs whose windows overlap (stride < kernel); a
            patchify conv (stride = kernel) is exactly a matrix on flattened patches, which the
            default orthogonalizes.
    """

    name = "SpectralConv"

    def __init__(
        self,
        steps: int | None = None,
        coefficients: str | Sequence[Sequence[float]] = "classic",
        ns_dtype: torch.dtype | None = None,
        polar: str = "newton_schulz",
        groups: int = 1,
        transpose: bool = False,
        per_tap: bool = False,
    ) -> None:
        super().__init__(steps=steps, coefficients=coefficients, ns_dtype=ns_dtype, polar=polar)
        self.groups = _check_positive(groups, "groups")
        self.transpose = bool(transpose)
        self.per_tap = bool(per_tap)

    def fits(self, shape: Sequence[int]) -> str | None:
        if len(shape) < 3:
            return "needs a conv weight (d_out, d_in, *kernel) with at least 3 dims"
        if shape[0] % self.groups:
            return f"has groups={self.groups}, which does not divide dim 0 ({shape[0]})"
        return None

    def dims(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(d_out, d_in)`` channels of one group's matrix."""
        a, b = shape[0] // self.groups, shape[1]
        return (b, a) if self.transpose else (a, b)

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        d_out, d_in = self.dims(shape)
        taps = math.prod(shape[2:])
        if self.per_tap:
            return self.groups * taps, d_out, d_in
        return self.groups, d_out, d_in * taps

    def _by_tap(self, g: Tensor) -> Tensor:
        """The stored tensor seen as ``(groups, d_out, d_in, taps)``: a view, or the transpose
        of one (:meth:`_from_by_tap` is the inverse)."""
        d_out, d_in = self.dims(g.shape)
        if self.transpose:
            return g.reshape(self.groups, d_in, d_out, -1).transpose(1, 2)
        return g.reshape(self.groups, d_out, d_in, -1)

    def _from_by_tap(self, t: Tensor, shape: Sequence[int]) -> Tensor:
        return (t.transpose(1, 2) if self.transpose else t).reshape(shape)

    def _matrices(self, g: Tensor) -> Tensor:
        if self.plain_reshape():
            return g.reshape(self.matrix_shape(g.shape))
        t = self._by_tap(g)
        return (t.permute(0, 3, 1, 2) if self.per_tap else t).reshape(self.matrix_shape(g.shape))

    def _assemble(self, blocks: list[Tensor], shape: Sequence[int]) -> Tensor:
        (mats,) = blocks
        if self.plain_reshape():
            return mats.reshape(shape)
        d_out, d_in = self.dims(shape)
        if self.per_tap:
            t = mats.reshape(self.groups, -1, d_out, d_in).permute(0, 2, 3, 1)
        else:
            t = mats.reshape(self.groups, d_out, d_in, -1)
        return self._from_by_tap(t, shape)

    def plain_reshape(self) -> bool:
        return not (self.transpose or self.per_tap)

    def scale_for(self, shape: Sequence[int]) -> float:
        d_out, d_in = self.dims(shape)
        return math.sqrt(d_out / d_in) / math.prod(shape[2:])

    def init(self, w: Tensor) -> Tensor:
        d_out, d_in = self.dims(w.shape)
        taps = math.prod(w.shape[2:])
        with torch.no_grad():
            mats = random_orthogonal((self.groups, taps, d_out, d_in), w.device, init_dtype(w))
            by_tap = mats.permute(0, 2, 3, 1).mul_(self.scale_for(w.shape))
            w.copy_(self._from_by_tap(by_tap, w.shape))
        return w


class _Grouped(Norm):
    """A norm whose LMO acts on independent groups of elements (Sign, ColNorm, RowNorm,
    BiasRMS). :meth:`group_spec` describes it for each shape, once; the reference
    (:meth:`lmo_many`), the distributed forms (:meth:`partial_sums`, :meth:`lmo_from_sums`) and
    the fused kernels all run that description."""

    def group_spec(self, shape: Sequence[int]) -> GroupSpec:
        raise NotImplementedError

    def lmo_many(self, gs: Sequence[Tensor]) -> list[Tensor]:
        """The same LMO on every tensor, in a few operations per call: Sign, and ℓ2 groups
        that are the whole tensor (BiasRMS), by ``torch._foreach_*`` over all of them; row and
        column groups stacked, one LMO call per shape of their matrices."""
        specs = self._kept("_specs", [g.shape for g in gs], self.group_spec)
        work = [g if g.dtype == _work_dtype(g) else g.to(_work_dtype(g)) for g in gs]
        out: list[Tensor | None] = [None] * len(gs)
        signs = [i for i, s in enumerate(specs) if s.sign]
        if signs:
            us = torch._foreach_sign([work[i] for i in signs])
            torch._foreach_mul_(us, [specs[i].q for i in signs])
            for i, u in zip(signs, us, strict=True):
                out[i] = u
        wholes = [i for i, s in enumerate(specs) if s.whole and not s.sign]
        if wholes:
            ws = [work[i] for i in wholes]
            norms = torch._foreach_norm(ws)
            # ‖v‖·q + ε for all norms that share q, ε, dtype and device at once, stacked.
            same: dict[tuple, list[int]] = {}
            for j, i in enumerate(wholes):
                key = (specs[i].q, specs[i].eps, norms[j].dtype, norms[j].device)
                same.setdefault(key, []).append(j)
            denominators: list[Tensor] = list(norms)
            for (q, eps, *_), js in same.items():
                stacked = torch.stack([norms[j] for j in js]).mul_(q).add_(eps)
                for j, d in zip(js, stacked.unbind(), strict=True):
                    denominators[j] = d
            for i, u in zip(wholes, torch._foreach_div(ws, denominators), strict=True):
                out[i] = u
        rest = [i for i, u in enumerate(out) if u is None]
        if rest:
            views = [work[i].reshape(specs[i].matrices) for i in rest]
            by_shape = {tuple(v.shape[1:]): specs[i] for v, i in zip(views, rest, strict=True)}
            res = _stacked_apply(
                views, lambda ms: _grouped_lmo(_cat(ms), by_shape[tuple(ms[0].shape[1:])])
            )
            for i, r in zip(rest, res, strict=True):
                out[i] = r.reshape(gs[i].shape)
        return out  # type: ignore[return-value]

    def partial_sums(self, d: Tensor) -> Tensor | None:
        spec = self.group_spec(d.shape)
        if spec.sign:
            return None
        m = d.to(torch.float64).reshape(spec.matrices)
        return m.square().sum(_group_dim(spec), keepdim=True)

    def lmo_from_sums(self, d: Tensor, sums: Tensor | None, shape: Sequence[int]) -> Tensor:
        m = d.to(_work_dtype(d)).reshape(self.group_spec(d.shape).matrices)
        norms = None if sums is None else sums.sqrt().to(m.dtype)
        return _grouped_lmo(m, self.group_spec(shape), norms).reshape(d.shape)


class Sign(_MatrixNorm, _Grouped):
    """The max-norm ball (scaled ℓ1→ℓ∞): ``lmo(g) = sign(g)/d_in``.

    Args:
        zero_init: ``init`` writes zeros instead of random signs.
        normalized: divide by ``d_in`` (``False``: plain ``sign(g)``).
        batch_dims: leading batch dims, as for :class:`Spectral`.
        transpose: the weight is stored ``(d_in, d_out)``: ``d_in`` is its last-but-one dim.
    """

    name = "Sign"

    def __init__(
        self,
        zero_init: bool = False,
        normalized: bool = True,
        batch_dims: int = 0,
        transpose: bool = False,
    ) -> None:
        self.zero_init = bool(zero_init)
        self.normalized = bool(normalized)
        self.batch_dims = _check_batch_dims(batch_dims)
        self.transpose = bool(transpose)

    def factor(self, shape: Sequence[int]) -> float:
        """The factor ``f`` of ``lmo = f·sign`` for a tensor of ``shape``: ``1/d_in`` or 1."""
        return 1.0 / max(self.dims(shape)[1], 1) if self.normalized else 1.0

    def group_spec(self, shape: Sequence[int]) -> GroupSpec:
        return GroupSpec(self.matrix_shape(shape), False, False, True, self.factor(shape), 0.0)

    def init(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            if self.zero_init:
                return w.zero_()
            signs = torch.randint(0, 2, w.shape, device=w.device).mul_(2).sub_(1)
            w.copy_(signs.to(init_dtype(w)).mul_(self.factor(w.shape)))
        return w


class ColNorm(_MatrixNorm, _Grouped):
    """Column normalization: ``lmo(g)[:, j] = g[:, j] / (‖g[:, j]‖₂/√d_out + ε)``.

    Args:
        normalized: also divide by ``d_in`` (the authors: only for non-input layers).
        transpose: work on ``gᵀ`` (for embeddings stored ``(vocab, dim)``).
        eps: the ε added to each column's RMS (1e-8, as the authors).
        batch_dims: leading batch dims, as for :class:`Spectral`.
    """

    name = "ColNorm"

    def __init__(
        self,
        normalized: bool = False,
        transpose: bool = False,
        eps: float = _EPS,
        batch_dims: int = 0,
    ) -> None:
        self.normalized = bool(normalized)
        self.transpose = bool(transpose)
        self.eps = _check_eps(eps)
        self.batch_dims = _check_batch_dims(batch_dims)

    #: The dim of the oriented matrices that the groups run along (a column: its rows).
    _dim = -2

    def _q(self, groups: int, length: int) -> float:
        """``q`` of :meth:`group_spec` for ``groups`` groups of ``length`` elements: the
        divisor is ``‖column‖₂/√d_out`` (times ``d_in`` when ``normalized``)."""
        return (groups if self.normalized else 1.0) / math.sqrt(max(length, 1))

    def group_spec(self, shape: Sequence[int]) -> GroupSpec:
        matrices = self.matrix_shape(shape)
        # The groups are the oriented matrices' columns (ColNorm) or rows (RowNorm);
        # ``transpose`` swaps rows and columns of the stored ones.
        columns = (self._dim == -2) != self.transpose
        r, c = matrices[1:]
        groups, length = (c, r) if columns else (r, c)
        return GroupSpec(matrices, columns, False, False, self._q(groups, length), self.eps)

    def init(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            into = self._init_in_place(w)  # drawn straight into w where it can be
            mats = into if into is not None else w.new_empty(self.matrix_shape(w.shape),
                                                             dtype=init_dtype(w))  # fmt: skip
            spec = self.group_spec(w.shape)  # the LMO's groups and scale, without its ε
            norms = torch.linalg.vector_norm(mats.normal_(), dim=_group_dim(spec), keepdim=True)
            mats.div_(norms * spec.q)
            if into is None:
                w.copy_(mats.reshape(w.shape))
        return w


class RowNorm(ColNorm):
    """Row normalization: ``lmo(g)[i, :] = g[i, :] / (‖g[i, :]‖₂·√d_in + ε)``.

    Args:
        normalized: include the ``√d_in`` (``False``: rows of unit ℓ2 norm; the authors use
            ``False`` only for the input layer).
        transpose: work on ``gᵀ`` (for embeddings stored ``(vocab, dim)``).
        eps: the ε added to each row's norm (1e-8, as the authors).
        batch_dims: leading batch dims, as for :class:`Spectral`.
    """

    name = "RowNorm"

    def __init__(
        self,
        normalized: bool = True,
        transpose: bool = False,
        eps: float = _EPS,
        batch_dims: int = 0,
    ) -> None:
        super().__init__(normalized, transpose, eps, batch_dims)

    _dim = -1

    def _q(self, groups: int, length: int) -> float:
        """The divisor is ``‖row‖₂`` (times ``√d_in`` when ``normalized``)."""
        return math.sqrt(length) if self.normalized else 1.0


class BiasRMS(_Grouped):
    """RMS normalization over all elements: ``lmo(g) = g / (RMS(g) + ε)``.

    Fits a tensor of any shape (biases, norm gains, position embeddings ``(1, N, D)``).
    """

    name = "BiasRMS"

    def __init__(self, eps: float = _EPS) -> None:
        self.eps = _check_eps(eps)

    def fits(self, shape: Sequence[int]) -> str | None:
        return None

    @staticmethod
    def factor(shape: Sequence[int]) -> float:
        """``1/√numel``: ``RMS(g) = ‖g‖₂·factor``."""
        return 1.0 / math.sqrt(max(math.prod(shape), 1))

    def group_spec(self, shape: Sequence[int]) -> GroupSpec:
        numel = math.prod(shape)
        return GroupSpec((1, 1, numel), False, True, False, self.factor(shape), self.eps)

    def init(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            return w.zero_()


class Auto(Norm):
    """Pick the norm from the tensor's dimension: ndim ≥ 3 → :class:`SpectralConv`, 2 →
    :class:`Spectral`, 0 or 1 → :class:`BiasRMS`.

    Keyword options are passed to every norm it picks that accepts them (e.g.
    ``Auto(coefficients="polar_express", eps=1e-6)``); an option no picked norm accepts raises.
    """

    name = "Auto"
    _CHOICES: ClassVar[tuple[type[Norm], ...]] = ()  # set below the class definitions

    def __init__(self, **options: Any) -> None:
        layout = sorted(set(options) & {"batch_dims", "transpose", "split", "groups"})
        if layout:
            raise ValueError(
                f"Auto picks the norm from ndim, so the layout option(s) {layout} would be "
                "ambiguous; name the norm, e.g. norm='Spectral' with norm_kwargs="
                "{'batch_dims': 1} for stacked matrices or norm='SpectralConv' with "
                "{'groups': ...} (param_groups sets these from the module types)"
            )
        accepted = {cls: _accepted_options(cls) for cls in self._CHOICES}
        unknown = set(options) - set().union(*accepted.values())
        if unknown:
            raise ValueError(
                f"Auto got unknown option(s) {sorted(unknown)}; the norms it picks accept "
                f"{sorted(set().union(*accepted.values()))}"
            )
        self.options = dict(options)
        self._norms = {
            cls: cls(**{k: v for k, v in options.items() if k in accepted[cls]})
            for cls in self._CHOICES
        }

    def _options(self) -> dict[str, Any]:
        return self.options

    def pick(self, shape: Sequence[int]) -> Norm:
        """The norm used for a tensor of ``shape``."""
        ndim = len(shape)
        cls = SpectralConv if ndim >= 3 else Spectral if ndim == 2 else BiasRMS
        return self._norms[cls]

    def fits(self, shape: Sequence[int]) -> str | None:
        return None

    def lmo_many(self, gs: Sequence[Tensor]) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(gs)
        for norm, idx in _group_by([self.pick(g.shape) for g in gs]).items():
            for i, r in zip(idx, norm.lmo_many([gs[i] for i in idx]), strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def init(self, w: Tensor) -> Tensor:
        return self.pick(w.shape).init(w)


Auto._CHOICES = (SpectralConv, Spectral, BiasRMS)

#: The norms by the names the optimizer's ``norm`` option takes.
NORMS: dict[str, type[Norm]] = {
    cls.name: cls for cls in (Spectral, SpectralConv, Sign, ColNorm, RowNorm, BiasRMS, Auto)
}


@eager_cache(maxsize=None)
def _accepted_options(cls: type[Norm]) -> frozenset[str]:
    return frozenset(k for k in inspect.signature(cls.__init__).parameters if k != "self")


def make_norm(norm: str | Norm, norm_kwargs: dict[str, Any] | None = None) -> Norm:
    """Build a norm from its name and options (or pass a :class:`Norm` instance through)."""
    if isinstance(norm, Norm):
        if norm_kwargs:
            raise ValueError("norm_kwargs cannot be combined with a Norm instance")
        return norm
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(NORMS)}")
    cls = NORMS[norm]
    kwargs = dict(norm_kwargs or {})
    if cls is not Auto:
        unknown = set(kwargs) - _accepted_options(cls)
        if unknown:
            raise ValueError(
                f"{norm} got unknown option(s) {sorted(unknown)}; "
                f"it accepts {sorted(_accepted_options(cls))}"
            )
    return cls(**kwargs)


def norms_that_fit(shape: Sequence[int]) -> list[str]:
    """Names of the norms (with default options) that apply to a tensor of ``shape``."""
    names = [name for name, cls in NORMS.items() if cls().fits(shape) is None]
    if len(shape) >= 3:
        names.append(f"Spectral with norm_kwargs={{'batch_dims': {len(shape) - 2}}}")
    return names


def describe_misfit(norm: Norm, shape: Sequence[int], what: str) -> str | None:
    """A full error message if ``norm`` does not apply to ``shape`` (``what`` names the tensor)."""
    reason = norm.fits(shape)
    if reason is None:
        return None
    return (
        f"{norm.name} cannot be applied to {what} of shape {_shape(shape)}: it {reason}. "
        f"Norms that fit this shape: {', '.join(norms_that_fit(shape))}"
    )
