"""Scion across ranks: replicated parameters (DDP), sharded ones (FSDP2 / DTensor), or both.

The step is the single-process step; what changes is where each LMO is computed.

- **Replicated parameters** (plain tensors with ``Scion(..., process_group=pg)`` after DDP has
  averaged the gradients, or DTensors with ``Replicate()`` placements): every rank holds the
  same averaged direction ``d``. Each Spectral-family matrix gets one *owner* rank, chosen by
  a greedy balance of the Newton–Schulz FLOPs (docs/math.md §4); owners orthogonalize their
  matrices and the updates are shared with ``all_gather_into_tensor``, in buckets. The cheap
  norms (Sign, ColNorm, RowNorm, BiasRMS) run on every rank, no communication.
- **Sharded parameters** (DTensors with ``Shard(0)``, as ``fully_shard`` makes them): the
  averaging and the update run on the local shards. A Spectral-family matrix is reassembled on
  its owner with one ``all_to_all_single`` per bucket, orthogonalized there, and its update
  scattered back with a second one, so each rank sends and receives about ``2·P/w`` elements
  per step (``P`` the Spectral parameters' size, ``w`` the shard count). Sign and RowNorm rows
  are whole on every shard and need nothing; ColNorm columns and BiasRMS's RMS span the shards
  and take one small all-reduce (sums of squares in float64) for all of them.
- **Both** (a 2-D mesh, ``(Replicate(), Shard(0))``: hybrid sharding): owners are spread over
  all ranks; the shard exchange runs inside each replica for the matrices it owns, then the
  update shards are shared across replicas with ``all_gather_into_tensor``.
- **Split along another dim** (``Shard(1)``: tensor parallelism's row-wise weights, from
  ``parallelize_module``): as sharded, along that dim. A group of a grouped norm spans the
  shards when the split runs along it (a row of a ``Shard(1)`` RowNorm, a column of a
  ``Shard(0)`` ColNorm) and takes the all-reduce; otherwise it is whole on every shard.
- **Laid out on several mesh dims** (FSDP2 over tensor parallelism on a (data, tensor) mesh:
  ``(_StridedShard(0), Shard(0))``, ``(Shard(0), Shard(1))``; HSDP over it on a (replicate,
  shard, tensor) mesh: ``(Replicate(), _StridedShard(0), Shard(0))``, and vectors repeated on
  two dims, ``(Replicate(), Shard(0), Replicate())``): a Spectral-family tensor is gathered
  whole on its owner with one ``all_to_all_single`` over the world, from one replica only,
  and every rank's part of its update sent back with a second. A grouped norm's rows or
  columns are indexed globally and their sums of squares (from one replica) all-reduced over
  the world; Sign, and groups whole on every rank, need nothing. Which rows and columns each
  rank holds is worked out from the placements alone, by splitting index lists as DTensor
  splits values (:func:`index_lists`); the mesh must hold every rank.

The exchanges go in buckets (:data:`BUCKET_ELEMENTS` per rank), pipelined: a bucket's gather
is in flight (asynchronous collectives) while the bucket before it computes its LMOs.

Every rank runs the same collectives in the same order: before each step one all-reduce agrees
on which parameters have a gradient on every rank (a parameter lacking one anywhere is skipped
everywhere, with a warning) and, unless ``nonfinite="ignore"``, which gradients are finite.
The owner choice and the buckets follow from the global shapes only, so a rank with an empty
shard or no matrices to orthogonalize still takes part. Never calls ``full_tensor()``.

The LMOs are the reference's (:mod:`scion_kernels.norms`, through its public methods), except
the owners' Newton–Schulz, which runs a backend's kernels where the group's route
(:mod:`scion_kernels.backends`) gives a parameter one.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .norms import Norm, Spectral

__all__ = ["LayoutError", "Placement", "placement_of", "local", "owner_slots", "shard_rows"]

#: Elements of one rank's share of a bucket before the next bucket starts.
BUCKET_ELEMENTS = 1 << 26

# all_gather_into_tensor, under the name newer PyTorch gives it (the old one warns there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (same storage), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def shard_rows(n: int, shards: int) -> list[int]:
    """Rows of each shard when ``n`` rows are split as ``Shard(0)`` splits them
    (``torch.chunk``: ``⌈n/shards⌉`` rows each, the last ones short or empty)."""
    size = -(-n // shards) if n else 0
    return [max(0, min(size, n - r * size)) for r in range(shards)]


@dataclass(frozen=True)
class Placement:
    """How one parameter lies across ranks: split along dim ``dim`` over ``shard_group``
    (``shards`` ranks) and repeated over ``replicate_group`` (``replicas`` ranks)."""

    shard_group: Any
    shards: int
    shard_rank: int
    replicate_group: Any
    replicas: int
    replica_rank: int
    #: The dim the shards split (``Shard(dim)``: 0 for FSDP2 and column-wise tensor
    #: parallelism, 1 for a row-wise one's weights).
    dim: int = 0
    #: For a tensor laid out on several mesh dims (FSDP2 or HSDP over tensor parallelism):
    #: its mesh and placements, from which every rank's elements are known
    #: (:func:`index_lists`).
    split_on: tuple[Any, tuple[Any, ...]] | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            id(self.shard_group), self.shards, id(self.replicate_group), self.replicas, self.dim,
            None if self.split_on is None else (id(self.split_on[0]), self.split_on[1]),
        )  # fmt: skip

    @property
    def slots(self) -> int:
        return self.shards * self.replicas


_SINGLE = Placement(None, 1, 0, None, 1, 0)


class LayoutError(ValueError):
    """A DTensor parameter's local tensor is not the piece its placements describe, on this
    rank (seen on some ranks only: :func:`check_layouts` makes every rank raise)."""


def placement_of(p: Tensor, process_group: Any | None) -> Placement:
    """How ``p`` lies across ranks: from a DTensor's placements, else ``process_group``
    replicas."""
    if not _is_dtensor(p):
        if process_group is None:
            return _SINGLE
        return Placement(
            None, 1, 0, process_group, dist.get_world_size(process_group),
            dist.get_rank(process_group),
        )  # fmt: skip
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    shards = [pl for pl in p.placements if isinstance(pl, _SPLITS())]
    replicas = [pl for pl in p.placements if isinstance(pl, Replicate)]
    if len(shards) > 1 or any(type(pl) is not Shard for pl in shards) or len(replicas) > 1:
        # Several mesh dims (HSDP over tensor parallelism on a 3-D mesh repeats its vectors
        # over two): gathered over the whole mesh.
        return _split_on_several(p)
    shard_dim = replicate_dim = None
    split = 0
    for dim, placement in enumerate(p.placements):
        # Shard itself: _StridedShard (FSDP2 over tensor parallelism) is a subclass whose
        # shards are not one block of the tensor.
        if type(placement) is Shard and shard_dim is None and 0 <= placement.dim < p.dim():
            shard_dim, split = dim, placement.dim
        elif isinstance(placement, Replicate) and replicate_dim is None:
            replicate_dim = dim
        else:
            raise ValueError(
                f"Scion takes DTensor parameters placed as Shard(d), _StridedShard and "
                f"Replicate() (FSDP2, DDP, hybrid, tensor parallelism, and FSDP2 over tensor "
                f"parallelism); got {p.placements}"
            )
    placement = Placement(
        mesh.get_group(shard_dim) if shard_dim is not None else None,
        mesh.size(shard_dim) if shard_dim is not None else 1,
        mesh.get_local_rank(shard_dim) if shard_dim is not None else 0,
        mesh.get_group(replicate_dim) if replicate_dim is not None else None,
        mesh.size(replicate_dim) if replicate_dim is not None else 1,
        mesh.get_local_rank(replicate_dim) if replicate_dim is not None else 0,
        split,
    )
    if p.dim():
        rows = shard_rows(p.shape[split], placement.shards)[placement.shard_rank]
        if local(p).shape[split] != rows:
            raise LayoutError(
                f"a Shard({split}) parameter of shape {tuple(p.shape)} holds "
                f"{local(p).shape[split]} along dim {split} on shard {placement.shard_rank} of "
                f"{placement.shards}; Scion expects {rows} (torch.chunk sizes, as fully_shard, "
                "parallelize_module and distribute_tensor use)"
            )
    return placement


def check_layouts(params: Sequence[Tensor], process_group: Any | None) -> None:
    """:func:`placement_of` for every parameter, raising on every rank alike. A placement
    Scion does not take is refused on every rank by itself; a local tensor that differs from
    its placements shows on some ranks only, so with DTensor parameters the ranks first agree
    by one all-reduce over ``process_group`` (default: the world, as each step's agreement)
    and then all raise."""
    error: LayoutError | None = None
    for p in params:
        try:
            placement_of(p, process_group)
        except LayoutError as e:
            error = error or e
    spread = [p for p in params if _is_dtensor(p)]
    if spread:
        ok = torch.tensor([error is None], dtype=torch.int32, device=local(spread[0]).device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=process_group)
        if error is None and not ok.item():
            error = LayoutError(
                "a DTensor parameter's local tensor differs from the piece its placements "
                "describe on another rank (see that rank's error); Scion cannot tell which "
                "elements each rank holds"
            )
    if error is not None:
        raise error


def _SPLITS() -> tuple[type, ...]:  # noqa: N802 - names a constant, imported on first use
    """The placement types that split a tensor: ``Shard``, and ``_StridedShard`` (its own
    class in recent PyTorch, a subclass of ``Shard`` in older ones)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return (Shard, _StridedShard)


def _split_on_several(p: Tensor) -> Placement:
    """The placement of a DTensor laid out on several mesh dims (``(Shard(0), Shard(1))``,
    FSDP2 over tensor parallelism's ``(_StridedShard(0), Shard(0))``, and on a 3-D mesh HSDP
    over it: ``(Replicate(), _StridedShard(0), Shard(0))``, ``(Replicate(), Shard(0),
    Replicate())``): its tensors are gathered whole on their owners over the whole mesh,
    which must be the world."""
    from torch.distributed.tensor import Replicate

    mesh = p.device_mesh
    if not all(isinstance(pl, (*_SPLITS(), Replicate)) for pl in p.placements):
        raise ValueError(
            f"Scion takes DTensor parameters placed as Shard(d), _StridedShard and "
            f"Replicate() (FSDP2, DDP, hybrid, tensor parallelism, and FSDP2 over tensor "
            f"parallelism); got {p.placements}"
        )
    if mesh.mesh.numel() != dist.get_world_size():
        raise ValueError(
            f"a DTensor laid out on several mesh dims ({p.placements}) must live on a mesh of "
            f"every rank ({dist.get_world_size()}); its mesh has {mesh.mesh.numel()}"
        )
    placements = tuple(p.placements)
    expected = _local_shape(tuple(p.shape), mesh, placements, dist.get_rank())
    if expected != tuple(local(p).shape):
        raise LayoutError(
            f"a DTensor of shape {tuple(p.shape)} placed as {p.placements} holds "
            f"{tuple(local(p).shape)} here; Scion expects {expected}, the piece DTensor's "
            "placements describe (FSDP2 over tensor parallelism stores some shapes whose "
            "chunks come out empty otherwise: a size divisible by the mesh dims' product "
            "avoids it)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    return Placement(dist.group.WORLD, world, rank, None, 1, 0, 0, (mesh, placements))


@functools.lru_cache(maxsize=1024)
def _local_shape(
    shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...], rank: int
) -> tuple[int, ...]:
    """The local shape ``rank`` holds of a tensor of ``shape`` under ``placements``."""
    return tuple(len(i) for i in index_lists(shape, mesh, placements)[rank])


def index_lists(
    shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]
) -> dict[int, tuple[Tensor, ...]]:
    """By global rank: for each dim of a tensor of ``shape``, the indices along it that rank
    holds under ``placements`` on ``mesh``; its local tensor is the whole one indexed by all
    of them at once (every placement picks along one dim, whatever the others pick). Made by
    splitting, per dim, an index tensor as DTensor splits values (each placement's own
    chunking, mesh dims left to right), on the CPU, without communication: a few integers per
    row and column, not per element."""
    pieces: dict[tuple[int, ...], list[Tensor]] = {
        (): [torch.arange(n).view([n if k == d else 1 for k in range(len(shape))])
             for d, n in enumerate(shape)]
    }  # fmt: skip
    for m, placement in enumerate(placements):
        n = mesh.size(m)
        split: dict[tuple[int, ...], list[Tensor]] = {}
        for coord, lists in pieces.items():
            for c in range(n):
                split[(*coord, c)] = list(lists)
            if isinstance(placement, _SPLITS()):
                d = placement.dim
                chunks = placement._split_tensor(lists[d], n, with_padding=False)[0]
                for c in range(n):
                    split[(*coord, c)][d] = chunks[c]
        pieces = split
    return {
        int(mesh.mesh[coord].item()): tuple(i.reshape(-1) for i in lists)
        for coord, lists in pieces.items()
    }


@functools.lru_cache(maxsize=256)
def _rank_indices(
    shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...], device: torch.device
) -> list[tuple[Tensor, ...]]:
    """:func:`index_lists` in rank order, on ``device`` (copied there once), each dim's list
    shaped to broadcast against the others (``whole[ix]`` is that rank's local tensor). An
    owner keeps them for the tensors it owns."""
    by_rank = index_lists(shape, mesh, placements)
    # Ranks that hold the same indices along a dim (all of an unsplit one, or the same
    # split) share one copy: about the tensor's rows and columns in all.
    shared: dict[tuple[int, bytes], Tensor] = {}

    def on_device(d: int, i: Tensor) -> Tensor:
        key = (d, i.numpy().tobytes())
        if key not in shared:
            shared[key] = i.view([-1 if k == d else 1 for k in range(len(shape))]).to(device)
        return shared[key]

    return [tuple(on_device(d, i) for d, i in enumerate(by_rank[r])) for r in range(len(by_rank))]


def distribute_like(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``whole`` laid out as the DTensor ``like``, with the values of the
    mesh's first rank (``distribute_tensor``: one scatter or broadcast)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements).to_local()


def _kind(norm: Norm, shape: Sequence[int], placement: Placement) -> str:
    """Where ``norm``'s LMO runs: ``"local"`` (on what this rank holds, exactly),
    ``"reduce"`` (on the local shard with the whole tensor's shape, after one all-reduce of
    the sums of squares of groups that span the shards), ``"owner"`` (on the whole tensor,
    on one rank); for a tensor laid out on several mesh dims, ``"world"`` (a grouped norm's
    sums of squares indexed by group and all-reduced over the world; Sign's factor read from
    the whole shape, nothing sent) or ``"gathered"`` (on the whole tensor, on one rank of the
    world). Depends on the global shape and the placement only, so every rank agrees."""
    # A batch of matrices split along batch dims only (expert parallelism's stacked experts,
    # on one mesh dim or, under FSDP2 too, on several) has whole matrices on every shard.
    batch_dims = getattr(norm, "batch_dims", 0) if len(shape) > 2 else 0
    if placement.split_on is not None:
        splits = [pl.dim % len(shape) for pl in placement.split_on[1] if isinstance(pl, _SPLITS())]
        if splits and all(d < batch_dims for d in splits):
            return "local"
        spec = None if isinstance(norm, Spectral) else norm.group_spec(shape)
        # Groups this module can index: Sign's (none needed), the whole tensor, or the rows
        # or columns of a matrix stored as it is seen.
        if spec is not None and (spec.sign or spec.whole or spec.matrices == (1, *shape)):
            whole_groups = not any(_spans(spec, shape, d) for d in splits)
            if whole_groups and not any(_reads_split(norm, shape, spec, d) for d in splits):
                return "local"
            return "world"
        return "gathered"
    sharded = placement.shards > 1 and len(shape) > 0
    batched = sharded and placement.dim < batch_dims
    if isinstance(norm, Spectral):
        # Replicated too: one owner orthogonalizes, the others receive its update.
        return "local" if batched else "owner"
    if not sharded:
        return "local"
    spec = norm.group_spec(shape)
    if spec is None:
        return "owner"  # a norm this module does not know: computed on the whole tensor
    if batched:
        return "local"
    if _spans(spec, shape, placement.dim):
        return "reduce"
    # Each group is whole on every shard; its LMO is the tensor's unless its factor reads
    # the split dim (a transposed weight's d_in or d_out).
    return "reduce" if _reads_split(norm, shape, spec, placement.dim) else "local"


def _reads_split(norm: Norm, shape: Sequence[int], spec: Any, dim: int) -> bool:
    """Whether the factor ``q`` of ``norm``'s ``spec`` on a tensor of ``shape`` depends on the
    size of dim ``dim`` (so a piece split along it cannot compute its LMO alone)."""
    grown = list(shape)
    grown[dim] += 1
    grown_spec = norm.group_spec(tuple(grown))
    return grown_spec is None or grown_spec.q != spec.q


def _spans(spec: Any, shape: Sequence[int], dim: int) -> bool:
    """Whether the groups of ``spec`` (a :class:`~scion_kernels.norms.GroupSpec` of a tensor of
    ``shape``) span the shards of a split along ``dim``: the whole tensor's does; a column runs
    down the stored rows (dim -2), a row along the columns (dim -1)."""
    return spec.whole or dim == len(shape) - (2 if spec.columns else 1)


def _ns_cost(norm: Norm, shape: Sequence[int]) -> float:
    """Newton–Schulz FLOPs of one LMO (docs/math.md §4): per step and ``m×n`` matrix (``m ≤ n``),
    ``2m²n`` (X·Xᵀ) + ``2m³`` (A·A) + ``2m²n`` (B·X); other norms cost their element count."""
    if not isinstance(norm, Spectral):
        return float(math.prod(shape))
    batch, d_out, d_in = norm.matrix_shape(shape)
    m, n = min(d_out, d_in), max(d_out, d_in)
    return float(batch * len(norm.table) * (4 * m * m * n + 2 * m**3))


def _costs(items: list[_Item]) -> list[float]:
    return [_ns_cost(it.norm, it.shape) for it in items]


def owner_slots(costs: Sequence[float], slots: int) -> list[int]:
    """Greedy balance (longest first, onto the least-loaded slot, ties to the lowest index):
    the slot that computes each item. Depends only on ``costs``, so every rank agrees."""
    load = [0.0] * slots
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(slots), key=lambda s: (load[s], s))
        owner[i] = slot
        load[slot] += costs[i]
    return owner


@dataclass
class _Item:
    index: int  # position in the group's parameter list
    shape: torch.Size  # global shape
    norm: Norm
    d: Tensor  # this rank's part of the averaged direction
    polar: Callable[[Tensor], Tensor] | None  # a backend's polar factor, or the reference's
    owner: int = 0  # slot: replica · shards + shard
    dim: int = 0  # the dim the shards split
    split_on: tuple[Any, tuple[Any, ...]] | None = None  # mesh and placements, split on several

    @property
    def row_elems(self) -> int:
        """Elements per index of the split dim ("a row" of it)."""
        return math.prod(s for k, s in enumerate(self.shape) if k != self.dim)

    def rows(self, shards: int) -> list[int]:
        """Each shard's extent along the split dim."""
        if not len(self.shape):
            return [1] + [0] * (shards - 1)
        return shard_rows(self.shape[self.dim], shards)

    def share(self, shards: int) -> int:
        """The most elements one of ``shards`` ranks holds (laid out on several mesh dims:
        about an even share)."""
        if self.split_on is not None:
            return -(-math.prod(self.shape) // shards)
        return max(self.rows(shards)) * self.row_elems

    def piece(self, rows: int) -> list[int]:
        """The shape of a shard holding ``rows`` of the split dim."""
        shape = list(self.shape)
        if shape:
            shape[self.dim] = rows
        return shape


def _buckets(items: list[_Item], shards: int) -> list[list[_Item]]:
    """Consecutive runs of ``items`` whose largest per-rank shares (elements, over ``shards``
    ranks) sum to at most the bucket size (at least one item each)."""
    out: list[list[_Item]] = []
    current: list[_Item] = []
    size = 0
    for item in items:
        share = item.share(shards)
        if current and size + share > BUCKET_ELEMENTS:
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += share
    if current:
        out.append(current)
    return out


#: One bucket's round trip (:func:`_pipelined`): yields after launching its gather to the
#: owners and after launching its scatter back; returns this rank's updates.
Round = Generator[None, None, dict[int, Tensor]]


def _pipelined(rounds: list[Round]) -> dict[int, Tensor]:
    """Run the buckets' round trips so that bucket ``b + 1``'s gather is in flight while bucket
    ``b``'s LMOs compute (asynchronous collectives: a separate stream under NCCL, gloo's worker
    threads on CPUs), with at most three buckets under way: bucket ``b − 1`` is finished
    (its scatter waited for, unpacked, shared across replicas) as soon as ``b`` has launched
    its scatter. Every rank issues the same collectives in the same order: gather 0, gather 1,
    scatter 0, gather 2, scatter 1, end 0, gather 3, scatter 2, end 1, …"""
    out: dict[int, Tensor] = {}
    live: list[Round | None] = list(rounds)

    def advance(k: int) -> None:
        step = live[k] if 0 <= k < len(live) else None
        if step is None:
            return
        try:
            next(step)
        except StopIteration as done:
            out.update(done.value)
            live[k] = None

    for k in range(len(live) + 2):
        advance(k)  # launch bucket k's gather
        advance(k - 1)  # wait for bucket k-1's, compute its LMOs, launch its scatter
        advance(k - 2)  # wait for bucket k-2's scatter, unpack it, share it
    return out


def _all_to_all(
    output: Tensor, parts: list[Tensor], out_splits: list[int], in_splits: list[int], group: Any
) -> Any:
    """Launch ``all_to_all_single`` of ``parts`` (concatenated) without waiting; its work."""
    payload = torch.cat(parts) if parts else output.new_empty(0)
    return dist.all_to_all_single(
        output, payload, out_splits, in_splits, group=group, async_op=True
    )


def _owner_round(items: list[_Item], placement: Placement) -> Round:
    """One bucket of ``Shard(d)`` tensors: reassemble this replica's matrices on their owners,
    compute their LMOs there, send the update rows back (two ``all_to_all_single`` over the
    shard group; none without sharding), then share the rows across replicas. Returns this
    rank's rows of every item's update."""
    S, me = placement.shards, placement.shard_rank
    mine = [it for it in items if it.owner // S == placement.replica_rank]
    out: dict[int, Tensor] = {}
    if S == 1 or not mine:
        yield
        yield
        out = _lmos(mine, [it.d for it in mine]) if mine else {}
        _share_across_replicas(items, placement, out)
        return out
    d_dtype = mine[0].d.dtype
    device = mine[0].d.device
    by_dest: list[list[_Item]] = [[it for it in mine if it.owner % S == o] for o in range(S)]
    send = [it.d.reshape(-1) for o in range(S) for it in by_dest[o]]
    send_splits = [sum(it.d.numel() for it in by_dest[o]) for o in range(S)]
    owned = by_dest[me]
    rows = [it.rows(S) for it in owned]  # each shard's rows of every owned item
    # Shard s sends its rows of the owned items here, and gets the same amount back.
    recv_splits = [
        sum(r[s] * it.row_elems for it, r in zip(owned, rows, strict=True)) for s in range(S)
    ]
    received = torch.empty(sum(recv_splits), dtype=d_dtype, device=device)
    work = _all_to_all(received, send, recv_splits, send_splits, placement.shard_group)
    yield
    work.wait()
    # Whole matrices: shard s's rows of every owned item, in item order, for s = 0, 1, ...
    pieces: list[list[Tensor]] = [[] for _ in owned]
    offset = 0
    for s in range(S):
        for k, it in enumerate(owned):
            n = rows[k][s] * it.row_elems
            pieces[k].append(received[offset : offset + n].view(it.piece(rows[k][s])))
            offset += n
    whole = [torch.cat(p, dim=it.dim) for p, it in zip(pieces, owned, strict=True)]
    updates = _lmos(owned, whole)
    out_dtype = mine[0].norm.update_dtype(d_dtype)
    parts = [
        updates[it.index].to(out_dtype).split(r, dim=it.dim)
        for it, r in zip(owned, rows, strict=True)
    ]
    back = [part[s].reshape(-1) for s in range(S) for part in parts]
    result = torch.empty(sum(send_splits), dtype=out_dtype, device=device)
    work = _all_to_all(result, back, send_splits, recv_splits, placement.shard_group)
    del received, pieces, whole, updates, parts, back  # the work keeps what it sends
    yield
    work.wait()
    offset = 0
    for o in range(S):
        for it in by_dest[o]:
            out[it.index] = result[offset : offset + it.d.numel()].view(it.d.shape)
            offset += it.d.numel()
    _share_across_replicas(items, placement, out)
    return out


@functools.lru_cache(maxsize=64)
def _coordinates(mesh: Any) -> Tensor:
    """Each global rank's coordinates on ``mesh`` (which holds every rank), ``(world, ndim)``."""
    grid = mesh.mesh
    where = torch.stack(
        torch.meshgrid(*[torch.arange(n) for n in grid.shape], indexing="ij"), dim=-1
    ).reshape(-1, grid.dim())
    coords = torch.empty_like(where)
    coords[grid.reshape(-1)] = where
    return coords


@functools.lru_cache(maxsize=4096)
def _senders(mesh: Any, placements: tuple[Any, ...], owner: int) -> tuple[bool, ...]:
    """By global rank: whether that rank sends its part of a tensor laid out as ``placements``
    to ``owner`` (:func:`_gathered_round`), or adds it (:func:`_world_reduced_updates`): the
    ranks whose coordinates on the mesh dims that repeat the tensor (``Replicate()``) are the
    owner's, which together hold it once."""
    from torch.distributed.tensor import Replicate

    repeated = tuple(m for m, pl in enumerate(placements) if isinstance(pl, Replicate))
    coords = _coordinates(mesh)
    return _senders_at(mesh, repeated, tuple(coords[owner, list(repeated)].tolist()))


@functools.lru_cache(maxsize=256)
def _senders_at(mesh: Any, repeated: tuple[int, ...], at: tuple[int, ...]) -> tuple[bool, ...]:
    """:func:`_senders` for the owner's coordinates ``at`` on the mesh dims ``repeated`` (a
    few entries per mesh: the replicas, not the owners)."""
    coords = _coordinates(mesh)[:, list(repeated)]
    return tuple((coords == torch.tensor(at, dtype=coords.dtype)).all(dim=1).tolist())


def _gathered_round(items: list[_Item]) -> Round:
    """One bucket of tensors laid out on several mesh dims (every norm): each gathered whole on
    its owner (``it.owner``, any rank) with one ``all_to_all_single`` over the world, from one
    copy of each element only (the ranks :func:`_senders` names), its LMO computed there, and
    every rank's elements of the update sent back with a second. Which elements each rank
    holds is known from the layout (:func:`index_lists`). Returns this rank's part of every
    item's update."""
    world, me = dist.get_world_size(), dist.get_rank()
    dtype, device = items[0].d.dtype, items[0].d.device
    mine = [k for k, it in enumerate(items) if it.owner == me]
    # Only an owner needs to know where each rank's part goes (a sender sends it whole).
    where: dict[int, list[tuple[Tensor, ...]]] = {}
    sizes: dict[int, list[int]] = {}
    for k in mine:
        assert items[k].split_on is not None
        where[k] = _rank_indices(tuple(items[k].shape), *items[k].split_on, device)
        sizes[k] = [math.prod(i.numel() for i in ix) for ix in where[k]]
    sends = [_senders(*it.split_on, it.owner) for it in items]  # type: ignore[misc]
    to_owner = [
        [k for k, it in enumerate(items) if it.owner == o and sends[k][me]] for o in range(world)
    ]
    send_splits = [sum(items[k].d.numel() for k in ks) for ks in to_owner]
    recv_splits = [sum(sizes[k][r] for k in mine if sends[k][r]) for r in range(world)]
    received = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    send = [items[k].d.reshape(-1) for ks in to_owner for k in ks]
    work = _all_to_all(received, send, recv_splits, send_splits, None)
    yield
    work.wait()
    wholes = {k: torch.empty(items[k].shape, dtype=dtype, device=device) for k in mine}
    offset = 0
    for r in range(world):
        for k in mine:
            if sends[k][r]:
                n, ix = sizes[k][r], where[k][r]
                piece = received[offset : offset + n].view([i.numel() for i in ix])
                if ix:
                    wholes[k].index_put_(ix, piece)
                else:  # a 0-dim tensor
                    wholes[k].copy_(piece)
                offset += n
    updates = _lmos([items[k] for k in mine], [wholes[k] for k in mine])
    out_dtype = items[0].norm.update_dtype(dtype)
    whole = {k: updates[items[k].index].to(out_dtype) for k in mine}
    back = [
        (whole[k][where[k][r]] if where[k][r] else whole[k]).reshape(-1)
        for r in range(world)
        for k in mine
    ]
    back_splits = [sum(sizes[k][r] for k in mine) for r in range(world)]
    from_owner = [[k for k, it in enumerate(items) if it.owner == o] for o in range(world)]
    result_splits = [sum(items[k].d.numel() for k in ks) for ks in from_owner]
    result = torch.empty(sum(result_splits), dtype=out_dtype, device=device)
    work = _all_to_all(result, back, result_splits, back_splits, None)
    del received, wholes, updates, whole, back  # the work keeps what it sends
    yield
    work.wait()
    out: dict[int, Tensor] = {}
    offset = 0
    for ks in from_owner:
        for k in ks:
            n = items[k].d.numel()
            out[items[k].index] = result[offset : offset + n].view(items[k].d.shape)
            offset += n
    return out


def _lmos(items: list[_Item], directions: list[Tensor]) -> dict[int, Tensor]:
    """Each item's LMO, batched per norm and polar factor as the single-process step
    batches."""
    out: dict[int, Tensor] = {}
    by_norm: dict[tuple[int, int], list[int]] = {}
    for k, it in enumerate(items):
        by_norm.setdefault((id(it.norm), id(it.polar)), []).append(k)
    for ks in by_norm.values():
        norm, polar, gs = items[ks[0]].norm, items[ks[0]].polar, [directions[k] for k in ks]
        if polar is None:
            updates = norm.lmo_many(gs)
        else:
            assert isinstance(norm, Spectral)
            updates = norm.lmo_many(gs, polar=polar)
        for k, u in zip(ks, updates, strict=True):
            out[items[k].index] = u
    return out


def _share_across_replicas(
    items: list[_Item], placement: Placement, out: dict[int, Tensor]
) -> None:
    """Fill ``out`` with the update rows of the items other replicas own: one
    ``all_gather_into_tensor`` over the replicas, each sending its owned items' rows."""
    S, R = placement.shards, placement.replicas
    if R == 1:
        return
    by_replica = [[it for it in items if it.owner // S == k] for k in range(R)]
    sizes = [sum(it.d.numel() for it in group) for group in by_replica]
    width = max(sizes)
    if width == 0:
        return
    dtype = items[0].norm.update_dtype(items[0].d.dtype)
    device = items[0].d.device
    send = torch.zeros(width, dtype=dtype, device=device)
    mine = by_replica[placement.replica_rank]
    if mine:
        torch.cat(
            [out[it.index].to(dtype).reshape(-1) for it in mine],
            out=send[: sizes[placement.replica_rank]],
        )
    gathered = torch.empty(R * width, dtype=dtype, device=device)
    _all_gather_single(gathered, send, group=placement.replicate_group)
    for k in range(R):
        if k == placement.replica_rank:
            continue
        offset = k * width
        for it in by_replica[k]:
            out[it.index] = gathered[offset : offset + it.d.numel()].view(it.d.shape)
            offset += it.d.numel()


def _world_reduced_updates(items: list[_Item]) -> dict[int, Tensor]:
    """Grouped norms on tensors laid out on several mesh dims: each rank adds its groups' sums
    of squares (:meth:`~scion_kernels.norms.Norm.partial_sums`) into a vector of all the
    tensor's groups, at the groups' indices (:func:`index_lists` along the group dim); one
    float64 all-reduce over the world sums them for every item, and each rank computes the
    LMO of its piece with its groups' totals and the whole tensor's shape. Only one copy of
    each piece adds (the ranks with the first mesh rank's coordinates on the dims that repeat
    it); Sign reads the whole shape only and sends nothing."""
    me = dist.get_rank()
    device = items[0].d.device
    vectors: list[Tensor] = []
    picks: list[Tensor | None] = []
    partial = [it.norm.partial_sums(it.d) for it in items]
    for it, part in zip(items, partial, strict=True):
        if part is None:  # Sign
            picks.append(None)
            continue
        spec = it.norm.group_spec(it.shape)
        mesh, placements = it.split_on  # type: ignore[misc]
        adds = _senders(mesh, placements, int(mesh.mesh.reshape(-1)[0]))[me]
        if spec.whole:
            ids = torch.zeros(1, dtype=torch.long, device=device)
            vector = part.sum().reshape(1) if adds else part.new_zeros(1)
        else:
            d = 1 if spec.columns else 0  # the stored matrix's dim that indexes the groups
            ids = _rank_indices(tuple(it.shape), mesh, placements, device)[me][d].reshape(-1)
            vector = part.new_zeros(it.shape[d])
            if adds:
                vector.index_add_(0, ids, part.reshape(-1))
        vectors.append(vector)
        picks.append(ids)
    if vectors:
        sums = torch.cat(vectors)
        dist.all_reduce(sums)
        vectors = list(sums.split([v.numel() for v in vectors]))
    out: dict[int, Tensor] = {}
    totals = iter(vectors)
    for it, part, ids in zip(items, partial, picks, strict=True):
        mine = None if ids is None or part is None else next(totals)[ids].view(part.shape)
        out[it.index] = it.norm.lmo_from_sums(it.d, mine, it.shape)
    return out


def _reduced_updates(items: list[_Item], placement: Placement) -> dict[int, Tensor]:
    """Grouped norms on shards: the sums of squares of the groups that span the shards (a
    column's, or the whole tensor's) in one float64 all-reduce over the shard group for all
    items, then each LMO on the local rows with the whole tensor's shape
    (:meth:`~scion_kernels.norms.Norm.lmo_from_sums`)."""
    partial = [it.norm.partial_sums(it.d) for it in items]
    spans = []
    for it in items:
        spec = it.norm.group_spec(it.shape)
        spans.append(spec is not None and _spans(spec, it.shape, it.dim))
    shared = [p for p, span in zip(partial, spans, strict=True) if span and p is not None]
    if shared:
        sums = torch.cat([p.reshape(-1) for p in shared])
        dist.all_reduce(sums, group=placement.shard_group)
        offset = 0
        for k, (p, span) in enumerate(zip(partial, spans, strict=True)):
            if span and p is not None:
                partial[k] = sums[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
    return {
        it.index: it.norm.lmo_from_sums(it.d, total, it.shape)
        for it, total in zip(items, partial, strict=True)
    }


def group_updates(
    norm: Norm,
    params: list[Tensor],
    directions: list[Tensor],
    process_group: Any,
    polars: Sequence[Callable[[Tensor], Tensor] | None],
) -> list[Tensor]:
    """Each parameter's ``lmo(d)`` rows on this rank (``directions``: this rank's part of the
    averaged directions), computed across ranks as the module docstring describes; a
    parameter's Spectral LMO with its ``polars`` entry (a backend's kernels) where not
    ``None``."""
    updates: dict[int, Tensor] = {}
    by_kind: dict[tuple[str, tuple], tuple[Placement, list[_Item]]] = {}
    for i, (p, d) in enumerate(zip(params, directions, strict=True)):
        placement = placement_of(p, process_group)
        concrete = norm.pick(p.shape)
        kind = _kind(concrete, p.shape, placement)
        polar = polars[i] if isinstance(concrete, Spectral) else None
        item = _Item(i, p.shape, concrete, d, polar, dim=placement.dim, split_on=placement.split_on)
        if kind == "local":
            by_kind.setdefault(("local", ()), (placement, []))[1].append(item)
            continue
        # Every tensor laid out on several mesh dims goes over the world: one exchange for all.
        where = None if kind in ("gathered", "world") else placement.key
        key = (kind, where, d.dtype, d.device, concrete.update_dtype(d.dtype))
        by_kind.setdefault((kind, key), (placement, []))[1].append(item)
    for (kind, _), (placement, items) in by_kind.items():
        if kind == "local":
            updates.update(_lmos(items, [it.d for it in items]))
        elif kind == "reduce":
            updates.update(_reduced_updates(items, placement))
        elif kind == "world":
            updates.update(_world_reduced_updates(items))
        elif kind == "gathered":
            world = dist.get_world_size()
            for it, rank in zip(items, owner_slots(_costs(items), world), strict=True):
                it.owner = rank
            updates.update(_pipelined([_gathered_round(b) for b in _buckets(items, world)]))
        else:
            for it, slot in zip(items, owner_slots(_costs(items), placement.slots), strict=True):
                it.owner = slot
            buckets = _buckets(items, placement.shards)
            updates.update(_pipelined([_owner_round(b, placement) for b in buckets]))
    return [updates[i] for i in range(len(params))]


def init_(norm: Norm, p: Tensor, scale: float, process_group: Any | None) -> None:
    """``p`` on the sphere of radius ``scale`` of ``norm`` (:meth:`Norm.init` times ``scale``),
    the same values on every replica: a DTensor is drawn whole and distributed from the first
    rank (``distribute_tensor``), a plain tensor under ``process_group`` broadcast from that
    group's first rank."""
    if _is_dtensor(p):
        whole = torch.empty(p.shape, dtype=p.dtype, device=local(p).device)
        norm.init(whole).mul_(scale)
        local(p).copy_(distribute_like(whole, p))
        return
    norm.init(p)
    p.mul_(scale)
    if process_group is not None:
        first = dist.get_global_rank(process_group, 0)
        dist.broadcast(p.data, first, group=process_group)


Work = list[tuple[int, dict[str, Any], list[int]]]


def agree_work(
    work: Work, process_group: Any, check_finite: bool, label: Callable[[dict, int, int], str]
) -> tuple[Work, tuple[int, dict[str, Any], int] | None]:
    """The step's ``(group index, group, parameter indices)`` agreed by one all-reduce,
    identically on every rank: the parameters that step (those with a gradient on every rank;
    the others are named, by ``label``, in a warning), and the first whose gradient is not
    finite on some rank (``None`` if none, or without ``check_finite``)."""
    where = [(index, group, i) for index, group, _ in work for i in range(len(group["params"]))]
    entries = [(group["params"][i], group["params"][i].grad) for _, group, i in where]
    has, finite = agree(entries, process_group, check_finite=check_finite)
    partial = [
        label(group, index, i)
        for (index, group, i), everywhere, (_, g) in zip(where, has, entries, strict=True)
        if g is not None and not everywhere
    ]
    warn_partial_gradients(partial)
    bad = next((w for w, ok, h in zip(where, finite, has, strict=True) if h and not ok), None)
    agreed = []
    for index, group, _ in work:
        idx = [
            i
            for k, (j, _, i) in enumerate(where)
            if j == index and has[k] and group["params"][i].numel()
        ]
        agreed.append((index, group, idx))
    return agreed, bad


def agree(
    entries: list[tuple[Tensor, Tensor | None]], process_group: Any, check_finite: bool
) -> tuple[list[bool], list[bool]]:
    """One all-reduce (MIN) over ``process_group`` (every rank, default: the world): for each
    ``(parameter, gradient or None)``, whether every rank has a gradient and, with
    ``check_finite``, whether every rank's gradient is finite."""
    if not entries:
        return [], []
    device = local(entries[0][0]).device
    has = torch.tensor([g is not None for _, g in entries], dtype=torch.int32, device=device)
    flags = [has]
    if check_finite:
        finite = torch.ones(len(entries), dtype=torch.int32, device=device)
        present = [k for k, (_, g) in enumerate(entries) if g is not None and local(g).numel()]
        if present:
            grads = [local(entries[k][1]) for k in present]  # type: ignore[arg-type]
            maxima = torch.stack([m.float() for m in torch._foreach_norm(grads, math.inf)])
            finite[present] = torch.isfinite(maxima).to(torch.int32)
        flags.append(finite)
    both = torch.cat(flags)
    dist.all_reduce(both, op=dist.ReduceOp.MIN, group=process_group)
    values = [bool(v) for v in both.tolist()]
    n = len(entries)
    return values[:n], values[n:] if check_finite else [True] * n


def warn_partial_gradients(labels: list[str]) -> None:
    if labels:
        warnings.warn(
            "Scion skipped parameters that have a gradient on some ranks but not on all: "
            + ", ".join(labels[:5])
            + (f" (and {len(labels) - 5} more)" if len(labels) > 5 else ""),
            RuntimeWarning,
            stacklevel=4,
        )
