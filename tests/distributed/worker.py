"""One rank of a multi-process test (gloo, CPU): ``python worker.py OUT_DIR SCENARIO [...]``.

Started by ``tests/test_distributed.py`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Each scenario returns a dict of measured values; the rank writes them all
to ``OUT_DIR/rank<r>.json`` and the test asserts on them. Every rank also computes the
single-process reference itself (same seeds), so no tensors need to cross processes.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from scion_kernels import Scion, ScionLight
from scion_kernels import distributed as sd

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])

# (norm, norm_kwargs, shapes): every norm, with shapes that shard unevenly or leave a rank empty
# (5 rows over 4 ranks: 2, 2, 1, 0), tall and wide matrices, a conv and stacked experts, and
# the layout options param_groups sets (transposed, split, grouped).
GROUPS = [
    ("Spectral", {}, [(5, 8), (13, 7), (7, 13), (16, 16), (3, 20)]),
    ("Spectral", {"batch_dims": 1}, [(5, 6, 4)]),
    ("Auto", {}, [(4, 3, 3, 3)]),
    ("Auto", {}, [(6,)]),
    ("Sign", {}, [(6, 10), (5, 3)]),
    ("Sign", {"transpose": True}, [(6, 10)]),  # d_in is dim 0, the sharded one
    ("Spectral", {"transpose": True, "split": (4, 6)}, [(6, 10)]),
    ("SpectralConv", {"groups": 2}, [(6, 2, 3)]),
    ("ColNorm", {}, [(6, 10), (5, 3)]),
    ("ColNorm", {"transpose": True}, [(6, 10)]),
    ("ColNorm", {"transpose": True, "normalized": True}, [(6, 10)]),
    ("RowNorm", {}, [(6, 10), (5, 3)]),
    ("RowNorm", {"transpose": True}, [(6, 10)]),
    ("BiasRMS", {}, [(10,), (3,), (1, 5, 4)]),
]


def label(group) -> str:
    """``norm(options)@first shape``, e.g. ``ColNorm(transpose=True)@6x10``."""
    norm, kwargs, shapes = group
    options = ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return f"{norm}({options})@" + "x".join(map(str, shapes[0]))


def make_groups(build, groups=GROUPS, seed=0, ns_dtype=None):
    """Parameter groups with the same values on every rank; ``build(full)`` makes each
    parameter (plain, or a DTensor of the full value). ``ns_dtype`` is given to the groups
    that may orthogonalize (Spectral, Auto) unless they set their own."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for norm, kwargs, shapes in groups:
        params = [torch.nn.Parameter(build(torch.randn(s, generator=gen))) for s in shapes]
        kwargs = dict(kwargs)
        if ns_dtype is not None and norm in ("Spectral", "Auto"):
            kwargs.setdefault("ns_dtype", ns_dtype)
        out.append({"params": params, "norm": norm, "norm_kwargs": kwargs, "scale": 3.0})
    return out


def gradients(groups, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [[torch.randn(p.shape, generator=gen) for p in g["params"]] for g in groups]


def full(t):
    return t.full_tensor() if sd._is_dtensor(t) else t


def compare(reference, distributed, into):
    """Per group: the largest absolute difference so far, and whether every value is equal."""
    for name, gr, gd in zip([label(g) for g in GROUPS], reference, distributed, strict=False):
        seen = into.setdefault(name, {"max_diff": 0.0, "exact": True})
        for pr, pd in zip(gr["params"], gd["params"], strict=True):
            a, b = pr.detach(), full(pd.detach())
            seen["exact"] &= torch.equal(a, b)
            seen["max_diff"] = max(seen["max_diff"], (a - b).abs().max().item())


def run_parity(build, grad_of, steps=3, cls=Scion, process_group=None, **opt_kwargs):
    """``steps`` steps of a distributed optimizer and of the single-process reference on the
    same values; the differences after every step.

    Newton–Schulz runs in float32 on every CPU: an owner multiplies its matrices in other
    batches and memory than one process does, and CPU BLAS kernels may round such products
    differently (a float32 ulp); in float32 that stays a float32-rounding difference, where
    in bf16 it could flip an operand's rounding."""
    ref_groups = make_groups(lambda t: t, ns_dtype=torch.float32)
    dist_groups = make_groups(build, ns_dtype=torch.float32)
    ref = cls(ref_groups, lr=0.1, momentum=0.5, backend="torch", **opt_kwargs)
    opt = cls(dist_groups, lr=0.1, momentum=0.5, process_group=process_group, **opt_kwargs)
    per_group: dict = {}
    for step in range(steps):
        grads = gradients(ref_groups, step)
        for gr, gd, gs in zip(ref_groups, dist_groups, grads, strict=True):
            for pr, pd, g in zip(gr["params"], gd["params"], gs, strict=True):
                if cls is ScionLight and pr.grad is not None:
                    pr.grad.add_(g)
                    sd.local(pd.grad).add_(sd.local(grad_of(g, pd)))
                else:
                    pr.grad = g.clone()
                    pd.grad = grad_of(g, pd)
        ref.step()
        opt.step()
        compare(ref_groups, dist_groups, per_group)
    return per_group


def sharded(mesh, placements, per_tensor=None):
    """Parameters made by ``distribute_tensor`` (a collective, as in real use), gradients by
    ``DTensor.from_local`` on this rank's part (no communication, so a rank may make some
    gradients alone); ``per_tensor(t)``: the placements of tensor ``t`` where they differ by
    tensor (else ``placements`` for all)."""

    def of(t):
        return placements if per_tensor is None else per_tensor(t)

    def build(t):
        return distribute_tensor(t, mesh, of(t))

    def grad_of(g, p):
        part = g
        for dim, placement in enumerate(of(g)):
            if isinstance(placement, Shard) and g.dim():
                sizes = sd.shard_rows(g.shape[placement.dim], mesh.size(dim))
                part = part.split(sizes, dim=placement.dim)[mesh.get_local_rank(dim)]
        return DTensor.from_local(
            part.contiguous(), mesh, of(g), run_check=False, shape=g.shape, stride=g.stride()
        )

    return build, grad_of


# ------------------------------------------------------------------------------ scenarios
def fsdp_parity():
    """DTensor Shard(0) parameters (as fully_shard makes them), every norm, 3 steps."""
    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, [Shard(0)])
    return run_parity(build, grad_of)


def fsdp_parity_light():
    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, [Shard(0)])
    return run_parity(build, grad_of, cls=ScionLight)


def fsdp_parity_bf16_buffers():
    """bf16 averaging buffers: the direction crosses ranks in bf16, the update in fp32."""
    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, [Shard(0)])
    return run_parity(build, grad_of, buffer_dtype=torch.bfloat16)


def tp_parity():
    """Tensor parallelism on its own mesh, as ``parallelize_module`` lays it out: weights split
    along their columns (``RowwiseParallel``: ``Shard(1)``), vectors along their length
    (``ColwiseParallel``'s biases: ``Shard(0)``)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, None, lambda t: [Shard(1)] if t.dim() >= 2 else [Shard(0)])
    return run_parity(build, grad_of)


def _fsdp_over_tp(placements_of):
    """Parity with tensors split on both dims of a (data, tensor) mesh: ``placements_of(t)``
    gives each tensor's placements; gradients are distributed as the parameters are."""
    return run_parity(*_split_locally(_data_tensor_mesh(), placements_of))


def _data_tensor_mesh():
    return init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("dp", "tp"))


def _split_locally(mesh, placements_of):
    """``build`` and ``grad_of`` for ``run_parity`` on any placements: every rank holds the
    same full values and splits its own (``src_data_rank=None``), as a scatter could not
    (uneven ``_StridedShard`` pieces cannot be padded to one size)."""

    def build(t):
        return distribute_tensor(t, mesh, placements_of(t), src_data_rank=None)

    def grad_of(g, p):
        return distribute_tensor(g, mesh, placements_of(g), src_data_rank=None)

    return build, grad_of


def fsdp_tp_colwise_parity():
    """FSDP2 over column-wise tensor parallelism: every tensor ``(_StridedShard(0), Shard(0))``
    (rows split by the tensor-parallel dim first, then by the data-parallel one)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _fsdp_over_tp(lambda t: [_StridedShard(0, split_factor=WORLD // 2), Shard(0)])


def fsdp_tp_rowwise_parity():
    """FSDP2 over row-wise tensor parallelism: weights ``(Shard(0), Shard(1))``, vectors
    ``(Shard(0), Replicate())``."""
    return _fsdp_over_tp(
        lambda t: [Shard(0), Shard(1)] if t.dim() >= 2 else [Shard(0), Replicate()]
    )


def _hsdp_tp_mesh():
    """The 3-D mesh of HSDP over tensor parallelism: (replicate, shard, tensor), 2 each."""
    return init_device_mesh(
        "cpu", (2, 2, WORLD // 4), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
    )


def hsdp_tp_colwise_parity():
    """HSDP over column-wise tensor parallelism on the 3-D mesh: every tensor
    ``(Replicate(), _StridedShard(0), Shard(0))``."""
    from torch.distributed.tensor.placement_types import _StridedShard

    layout = [Replicate(), _StridedShard(0, split_factor=WORLD // 4), Shard(0)]
    return run_parity(*_split_locally(_hsdp_tp_mesh(), lambda t: layout))


def hsdp_tp_rowwise_parity():
    """HSDP over row-wise tensor parallelism on the 3-D mesh: weights ``(Replicate(),
    Shard(0), Shard(1))``, vectors ``(Replicate(), Shard(0), Replicate())`` (repeated on two
    mesh dims, as a norm's weight is under this layout)."""
    return run_parity(
        *_split_locally(
            _hsdp_tp_mesh(),
            lambda t: [Replicate(), Shard(0), Shard(1) if t.dim() >= 2 else Replicate()],
        )
    )


def hsdp_tp_collectives():
    """A Spectral-only step's collectives and volume on the 3-D mesh, every matrix
    ``(Replicate(), _StridedShard(0), Shard(0))``: one copy of each gathered (``P``), every
    rank's part sent back (``R·P``, ``R = 2`` replicas)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    layout = [Replicate(), _StridedShard(0, split_factor=WORLD // 4), Shard(0)]
    return _collectives(layout, split=_split_locally(_hsdp_tp_mesh(), lambda t: layout))


def hsdp_tp_training():
    """torchtitan's 3-D layout: ``parallelize_module`` on the tensor dim, then ``fully_shard``
    on the (replicate, shard) dims (HSDP); each data rank its slice of the batch. 5 steps
    within float32 rounding of one process."""
    from torch.distributed.fsdp import fully_shard

    ref_model, ref = mlp_with_scion([12, 32, 24, 5], 0, False)
    model, _ = mlp_with_scion([12, 32, 24, 5], 0, False)
    mesh = _hsdp_tp_mesh()
    _tensor_parallel(model, mesh["tp"])
    dp = mesh["dp_replicate", "dp_shard"]
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    placements = {name: str(p.placements) for name, p in model.named_parameters()}
    opt = mlp_with_scion_optimizer(model)
    k = mesh.get_local_rank("dp_replicate") * 2 + mesh.get_local_rank("dp_shard")
    worst = _five_steps(ref_model, ref, model, opt, 32, slice(8 * k, 8 * k + 8))
    return {"max_diff": worst, "placements": placements}


def bucketed():
    """Every tensor its own bucket (``BUCKET_ELEMENTS = 1``), so the round trips pipeline (a
    bucket's gather in flight while the one before computes): every norm's 3 steps as
    without buckets, under FSDP2 and FSDP2 over tensor parallelism, and a Spectral-only step's
    collectives (two ``all_to_all_single`` per bucket, ``2·P`` elements in all)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    saved, sd.BUCKET_ELEMENTS = sd.BUCKET_ELEMENTS, 1
    try:
        return {
            "fsdp": fsdp_parity(),
            "fsdp_tp": fsdp_tp_colwise_parity(),
            "collectives": _collectives([Shard(0)]),
            "fsdp_tp_collectives": _collectives(
                [_StridedShard(0, split_factor=WORLD // 2), Shard(0)],
                split=_split_locally(
                    _data_tensor_mesh(),
                    lambda t: [_StridedShard(0, split_factor=WORLD // 2), Shard(0)],
                ),
            ),
        }
    finally:
        sd.BUCKET_ELEMENTS = saved


def ddp_parity():
    """Replicated plain tensors with process_group: owners compute, all_gather shares."""
    return run_parity(lambda t: t, lambda g, p: g.clone(), process_group=dist.group.WORLD)


def hsdp_parity():
    """A 2-D mesh (replicate × shard), placements (Replicate(), Shard(0))."""
    mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("replicate", "shard"))
    build, grad_of = sharded(mesh, [Replicate(), Shard(0)])
    return run_parity(build, grad_of)


def _spectral_only(build):
    return make_groups(build, [("Spectral", {}, [(64, 48), (48, 64), (33, 40), (40, 40)])])


def fsdp_collectives():
    """Collectives of one Spectral-only FSDP step (CommDebugMode), and the elements each rank
    passes to all_to_all_single (a recording wrapper) against 2·P/w."""
    return _collectives([Shard(0)])


def tp_collectives():
    """The same for weights split along their columns (tensor parallelism's ``Shard(1)``)."""
    return _collectives([Shard(1)])


def ep_collectives():
    """The same for stacked experts ``(E, d_out, d_in)`` split along the expert dim (expert
    parallelism): each rank holds whole experts."""
    return _collectives([Shard(0)], [("Spectral", {"batch_dims": 1}, [(8, 12, 6), (5, 6, 12)])])


def fsdp_tp_collectives():
    """The same for matrices split on both dims of a (data, tensor) mesh, as FSDP2 over
    column-wise tensor parallelism splits them."""
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = _data_tensor_mesh()
    layout = [_StridedShard(0, split_factor=WORLD // 2), Shard(0)]
    return _collectives(layout, split=_split_locally(mesh, lambda t: layout))


def ep_2d_collectives():
    """Stacked experts split along the expert dim on both dims of a 2-D mesh (expert
    parallelism with FSDP2 over it: ``(Shard(0), Shard(0))``, 5 experts unevenly): whole
    experts on every rank, orthogonalized where they are."""
    layout = [Shard(0), Shard(0)]
    return _collectives(
        None,
        [("Spectral", {"batch_dims": 1}, [(8, 12, 6), (5, 6, 12)])],
        split=_split_locally(_data_tensor_mesh(), lambda t: layout),
    )


def fsdp_tp_grouped_collectives():
    """A Sign step and a ColNorm step on matrices under FSDP2 over column-wise tensor
    parallelism: Sign sends nothing, ColNorm all-reduces its columns' sums once."""
    from torch.distributed.tensor.placement_types import _StridedShard

    layout = [_StridedShard(0, split_factor=WORLD // 2), Shard(0)]
    split = _split_locally(_data_tensor_mesh(), lambda t: layout)
    shapes = [(64, 48), (33, 40)]
    return {
        norm: _collectives(None, [(norm, {}, shapes)], split=split) for norm in ("Sign", "ColNorm")
    }


def fsdp_tp_mixed_collectives():
    """The same with column- and row-wise layouts in one group (``(_StridedShard(0), Shard(0))``
    for matrices with an even row count, ``(Shard(0), Shard(1))`` for the rest): one exchange
    for both."""
    from torch.distributed.tensor.placement_types import _StridedShard

    def layout(t):
        if t.shape[0] % 2:
            return [Shard(0), Shard(1)]
        return [_StridedShard(0, split_factor=WORLD // 2), Shard(0)]

    return _collectives(None, split=_split_locally(_data_tensor_mesh(), layout))


def _collectives(placements, spec=None, split=None):
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, placements) if split is None else split
    groups = _spectral_only(build) if spec is None else make_groups(build, spec)
    opt = Scion(groups, lr=0.1, momentum=0.5)
    for p in groups[0]["params"]:
        p.grad = grad_of(torch.randn(p.shape), p)
    sent = []
    original = dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        sent.append(input.numel())
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        with CommDebugMode() as comm:
            opt.step()
    finally:
        dist.all_to_all_single = original
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    total = sum(p.numel() for p in groups[0]["params"])
    return {"counts": counts, "sent": sum(sent), "calls": len(sent), "P": total, "w": WORLD}


def partial_gradients():
    """One parameter has a gradient on rank 0 only, one on no rank: both are skipped on every
    rank (with a warning on rank 0), the others step, nothing hangs."""
    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, [Shard(0)])
    groups = make_groups(build, [("Spectral", {}, [(8, 6), (6, 8), (7, 7)])])
    params = groups[0]["params"]
    before = [full(p.detach()).clone() for p in params]
    opt = Scion(groups, lr=0.1, momentum=1.0)
    params[0].grad = grad_of(torch.randn(8, 6), params[0])
    if RANK == 0:
        params[1].grad = grad_of(torch.randn(6, 8), params[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    # full_tensor() is a collective; the rank without the gradient must still join it.
    changed = [not torch.equal(full(p.detach()), b) for p, b in zip(params, before, strict=True)]
    return {
        "changed": changed,
        "warned": any("some ranks but not on all" in str(w.message) for w in caught),
    }


def nonfinite():
    """A NaN in one rank's shard: "skip" skips the step on every rank, "raise" raises on every
    rank, naming the parameter."""
    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, [Shard(0)])
    out = {}
    for policy in ("skip", "raise"):
        groups = make_groups(build, [("Spectral", {}, [(8, 6)]), ("Sign", {}, [(8, 4)])])
        params = [p for g in groups for p in g["params"]]
        before = [full(p.detach()).clone() for p in params]
        opt = Scion(groups, lr=0.1, momentum=0.5, nonfinite=policy)
        for p in params:
            p.grad = grad_of(torch.randn(p.shape), p)
        if RANK == WORLD - 1:
            sd.local(params[1].grad)[0, 0] = float("nan")
        raised = ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                opt.step()
            except FloatingPointError as e:
                raised = str(e)
        unchanged = all(
            torch.equal(full(p.detach()), b) for p, b in zip(params, before, strict=True)
        )
        out[policy] = {"unchanged": unchanged, "raised": raised, "skipped": opt.skipped_steps}
    return out


#: Newton–Schulz options for the trajectory comparisons. Ranks average gradients in another
#: order than one process, so the directions differ in float32 rounding; in bf16 such a
#: difference can flip the rounding of an operand and move the update by a bf16 ulp (~0.4%),
#: which training then carries on. In float64 the polar factor depends continuously on the
#: direction, and the comparison measures the distributed step, not bf16's rounding.
F64_NS = {"ns_dtype": torch.float64}


def mlp_with_scion(widths, seed: int, sharded_model: bool, mesh=None):
    """A GELU MLP (seeded) and its Scion (the "mlp" recipe, Newton–Schulz in float64),
    fully_shard-ed over all ranks (each Linear, then the whole; ``mesh``: a 1-D one by
    default) or plain."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers[:-1])
    if sharded_model:
        mesh = mesh or init_device_mesh("cpu", (WORLD,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, mlp_with_scion_optimizer(model)


def mlp_with_scion_optimizer(model):
    """The "mlp" recipe's Scion for ``model``, Newton–Schulz in float64."""
    from scion_kernels import RECIPES, param_groups

    recipe = RECIPES["mlp"]
    overrides = {
        role: {"norm_kwargs": {**getattr(recipe, role).norm_kwargs, **F64_NS}}
        for role in ("input", "hidden")
    }
    groups = param_groups(model, recipe=recipe, overrides=overrides)
    return Scion(groups, lr=0.05, momentum=0.1)


def fully_shard_training(mesh=None):
    """A real MLP under fully_shard, each rank its own batch, against one process on the
    whole batch: 5 steps, every parameter within float32 reduction-order tolerance."""
    ref_model, ref = mlp_with_scion([12, 32, 24, 5], 0, False)
    model, opt = mlp_with_scion([12, 32, 24, 5], 0, True, mesh)
    mine = slice(8 * RANK, 8 * RANK + 8)
    return {"max_diff": _five_steps(ref_model, ref, model, opt, 8 * WORLD, mine)}


def _five_steps(ref_model, ref, model, opt, batch: int, mine: slice) -> float:
    """Five steps of the one-process model on seeded batches of ``batch`` rows and of this
    rank's model on its rows ``mine``; the largest parameter difference seen."""
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for _ in range(5):
        x = torch.randn(batch, 12, generator=gen)
        y = torch.randint(0, 5, (batch,), generator=gen)
        for m, o, rows in ((ref_model, ref, slice(None)), (model, opt, mine)):
            torch.nn.functional.cross_entropy(m(x[rows]), y[rows]).backward()
            o.step()
            o.zero_grad()
        for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
            worst = max(worst, (a.detach() - full(b.detach())).abs().max().item())
    return worst


def tensor_parallel_training():
    """The MLP with its first two Linears split by ``parallelize_module`` (column-wise, then
    row-wise: weights ``Shard(0)`` and ``Shard(1)``, biases ``Shard(0)`` and ``Replicate()``),
    every rank on the whole batch as tensor parallelism runs, against one process: 5 steps,
    every parameter within float32 reduction-order tolerance."""
    ref_model, ref = mlp_with_scion([12, 32, 24, 5], 0, False)
    model, _ = mlp_with_scion([12, 32, 24, 5], 0, False)
    _tensor_parallel(model)
    placements = {name: str(p.placements) for name, p in model.named_parameters()
                  if sd._is_dtensor(p)}  # fmt: skip
    opt = mlp_with_scion_optimizer(model)
    worst = _five_steps(ref_model, ref, model, opt, 8, slice(None))
    return {"max_diff": worst, "placements": placements}


def fsdp_tp_training():
    """FSDP2 over tensor parallelism on a (data, tensor) mesh, as torchtitan builds it:
    ``parallelize_module`` on the tensor dim, then ``fully_shard`` on the data dim; each data
    rank its slice of the batch. 5 steps within float32 rounding of one process."""
    ref_model, ref = mlp_with_scion([12, 32, 24, 5], 0, False)
    model, _ = mlp_with_scion([12, 32, 24, 5], 0, False)
    mesh = _fsdp_over_tensor_parallel(model)
    placements = {name: str(p.placements) for name, p in model.named_parameters()}
    opt = mlp_with_scion_optimizer(model)
    dp = mesh.get_local_rank("dp")
    worst = _five_steps(ref_model, ref, model, opt, 16, slice(8 * dp, 8 * dp + 8))
    return {"max_diff": worst, "placements": placements}


def hybrid_shard_training():
    """fully_shard on a 2-D mesh (replicate × shard: hybrid sharding), as above."""
    mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("replicate", "shard"))
    return fully_shard_training(mesh)


def init_everywhere():
    """``opt.init()`` with a different random seed on every rank: the same values on every
    rank (FSDP2: drawn whole and distributed; DDP: broadcast), on the norm's sphere."""
    out = {}
    for mode in ("fsdp", "ddp"):
        model, opt = mlp_with_scion([12, 32, 5], 0, mode == "fsdp")
        if mode == "ddp":
            opt = Scion(
                [torch.nn.Parameter(torch.zeros(32, 12)), torch.nn.Parameter(torch.zeros(5, 32))],
                norm="Spectral", scale=2.0, process_group=dist.group.WORLD,
            )  # fmt: skip
            params = opt.param_groups[0]["params"]
        else:
            params = list(model.parameters())
        torch.manual_seed(1000 + RANK)
        opt.init()
        values = [full(p.detach()) for p in params]
        out[mode] = {
            "sums": [v.double().sum().item() for v in values],
            "spectral": [
                torch.linalg.matrix_norm(v.double(), 2).item() for v in values if v.dim() == 2
            ],
        }
    return out


def ddp_no_sync():
    """DDP with gradient accumulation under no_sync: two micro-batches per step, 3 steps,
    against one process on all of them."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    ref_model, model = mlp(), DDP(mlp())
    ref = Scion(ref_model.parameters(), lr=0.05, momentum=0.5, norm="Auto", norm_kwargs=F64_NS)
    opt = Scion(
        model.module.parameters(), lr=0.05, momentum=0.5, norm="Auto", norm_kwargs=F64_NS,
        process_group=dist.group.WORLD,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(3):
        batches = [
            (torch.randn(4 * WORLD, 10, generator=gen), torch.randn(4 * WORLD, 3, generator=gen))
            for _ in range(2)
        ]
        for x, y in batches:
            torch.nn.functional.mse_loss(ref_model(x), y).div(2).backward()
        ref.step()
        ref.zero_grad()
        mine = slice(4 * RANK, 4 * RANK + 4)
        with model.no_sync():
            x, y = batches[0]
            torch.nn.functional.mse_loss(model(x[mine]), y[mine]).div(2).backward()
        x, y = batches[1]
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).div(2).backward()
        opt.step()
        opt.zero_grad()
        for a, b in zip(ref_model.parameters(), model.module.parameters(), strict=True):
            worst = max(worst, (a.detach() - b.detach()).abs().max().item())
    return {"max_diff": worst}


def _fsdp_with_kernels(backend: str) -> dict:
    """FSDP with ``backend``: the owners' Newton–Schulz runs that backend's kernels (its
    implementation of the ``scion_kernels::polar`` op, whose calls are recorded). Against the
    single-process reference step: the relative difference of each parameter's change, beside
    the same measure for the backend's single-process fused step."""
    from scion_kernels import backends

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from recording import Recording

    mesh = init_device_mesh("cpu", (WORLD,))
    build, grad_of = sharded(mesh, [Shard(0)])
    spec = [("Spectral", {}, [(5, 8), (13, 7), (16, 16), (3, 20)]), ("Auto", {}, [(4, 3, 3, 3)])]
    runs = {}
    recording = Recording(backends.get(backend))
    plain = lambda t: t  # noqa: E731
    cases = [("reference", "torch", plain), ("fused", backend, plain),
             ("distributed", backend, build)]  # fmt: skip
    for name, case_backend, make in cases:
        groups = make_groups(make, spec, ns_dtype=torch.bfloat16)  # the kernels' dtype
        before = [full(p.detach()).clone() for g in groups for p in g["params"]]
        with backends.using(recording):
            opt = Scion(groups, lr=0.1, momentum=1.0, backend=case_backend)
            grads = gradients(groups, 0)
            for g, gs in zip(groups, grads, strict=True):
                for p, grad in zip(g["params"], gs, strict=True):
                    p.grad = grad_of(grad, p) if name == "distributed" else grad.clone()
            opt.step()
        after = [full(p.detach()) for g in groups for p in g["params"]]
        runs[name] = [a - b for a, b in zip(after, before, strict=True)]
    shapes = [list(args[0].shape) for args in recording.of("polar")]

    def rel(x, y):
        return max(((a - b).norm() / b.norm()).item() for a, b in zip(x, y, strict=True))

    return {"distributed": rel(runs["distributed"], runs["reference"]),
            "fused": rel(runs["fused"], runs["reference"]), "polar_calls": shapes}  # fmt: skip


def fsdp_triton():
    """backend="triton" under FSDP (Triton's interpreter on the CPU)."""
    from scion_kernels import backends

    why = backends.get("triton").unavailable_reason(torch.device("cpu"))
    if why is not None:
        return {"skipped": why}
    return _fsdp_with_kernels("triton")


def fsdp_native():
    """backend="cuda" under FSDP, the native kernels running in the host emulation
    (tests/native/emulated.py; built beforehand by the test, loaded here from its cache)."""
    if not os.environ.get("SCION_TEST_EMULATED"):
        return {"skipped": "the host emulation of the native module is not built"}
    sys.path.insert(0, str(Path(__file__).parent.parent / "native"))
    import emulated

    from scion_kernels import backends

    with backends.using(backends.NativeBackend(module=emulated.build())):
        return _fsdp_with_kernels("cuda")


def bad_layouts():
    """Clear errors at construction: a placement no engine gives a parameter (Partial), and a
    fused backend that cannot run on the parameters' device (native kernels, CPU tensors)."""
    from torch.distributed.tensor import Partial

    mesh = init_device_mesh("cpu", (WORLD,))
    errors = {}
    cases = {
        "partial": [Partial()],
        "cuda": [Shard(0)],
    }
    for name, placements in cases.items():
        backend = "cuda" if name == "cuda" else "auto"
        if name == "partial":
            t = DTensor.from_local(torch.randn(8, 8), mesh, placements, run_check=False)
        else:
            t = distribute_tensor(torch.randn(8, 8), mesh, placements)
        p = torch.nn.Parameter(t)
        try:
            Scion([p], norm="Spectral", backend=backend)
            errors[name] = ""
        except ValueError as e:
            errors[name] = str(e)
    # A local tensor that is not the piece its placements describe, on the last rank only
    # (1-D, and a (2, w/2) mesh): every rank raises, none waits.
    for name, grid, layout in (
        ("short_1d", mesh, [Shard(0)]),
        ("short_2d", _data_tensor_mesh(), [Shard(0), Shard(1)]),
    ):
        rows = 3 if RANK == WORLD - 1 else 8 // grid.size(0)
        cols = 8 // grid.size(1) if grid.ndim > 1 else 8
        t = DTensor.from_local(torch.randn(rows, cols), grid, layout, run_check=False,
                               shape=torch.Size((8, 8)), stride=(8, 1))  # fmt: skip
        try:
            Scion([torch.nn.Parameter(t)], norm="Spectral")
            errors[name] = ""
        except sd.LayoutError as e:
            errors[name] = str(e)
    return errors


def _checkpoint_model(layout: str):
    """The checkpoint tests' MLP and its Scion, laid out as ``layout``: ``"fsdp"`` (the saving
    run's), ``"plain"``, ``"tp"`` or ``"fsdp_tp"``."""
    # The loading runs start from other values than the saving one.
    model, opt = mlp_with_scion([12, 20, 7, 5], 0 if layout == "fsdp" else 123, layout == "fsdp")
    if layout in ("plain", "fsdp"):
        return model, opt
    if layout == "tp":
        _tensor_parallel(model)
    else:
        _fsdp_over_tensor_parallel(model)
    return model, mlp_with_scion_optimizer(model)


def _tensor_parallel(model, mesh=None):
    """``model``'s first two Linears split column-wise, then row-wise, over ``mesh`` (all
    ranks by default)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = mesh or init_device_mesh("cpu", (WORLD,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _fsdp_over_tensor_parallel(model):
    """``model`` as torchtitan lays it out on a (data, tensor) mesh: :func:`_tensor_parallel`
    on the tensor dim, then ``fully_shard`` (each Linear, then the whole) on the data dim;
    returns the mesh."""
    from torch.distributed.fsdp import fully_shard

    mesh = _data_tensor_mesh()
    _tensor_parallel(model, mesh["tp"])
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return mesh


def _manual_step(model, opt, step):
    """One step on seeded gradients (the same full values at every world size)."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen)
        if sd._is_dtensor(p):  # every rank has the full g: each splits its own part
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g
    opt.step()


def _full_state(model):
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def checkpoint_save():
    """FSDP2 at this world size: 2 steps, save model and optimizer with
    torch.distributed.checkpoint, then one more step whose result the loads must match."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    out = Path(os.environ["SCION_TEST_CHECKPOINT"])
    model, opt = _checkpoint_model("fsdp")
    keys = sorted(str(k) for k in opt.state_dict()["state"])
    for step in range(2):
        _manual_step(model, opt, step)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(out / "ckpt"))
    _manual_step(model, opt, 2)
    expected = _full_state(model)
    if RANK == 0:
        torch.save(expected, out / "expected.pt")
    return {"state_keys_before_first_step": keys}


def checkpoint_load(layout: str | None = None):
    """Load the checkpoint at this world size (FSDP2, or a plain model when alone; or the
    ``layout`` of :func:`_checkpoint_model`) and take the next step: the parameters must
    equal the saving run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out = Path(os.environ["SCION_TEST_CHECKPOINT"])
    model, opt = _checkpoint_model(layout or ("fsdp" if WORLD > 1 else "plain"))
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(out / "ckpt"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    _manual_step(model, opt, 2)
    got = _full_state(model)
    expected = torch.load(out / "expected.pt")
    return {
        "identical": all(torch.equal(got[n], expected[n]) for n in expected),
        "max_diff": max((got[n] - expected[n]).abs().max().item() for n in expected),
    }


def checkpoint_load_tp():
    """The FSDP2 checkpoint loaded into the tensor-parallel layout."""
    return checkpoint_load("tp")


def checkpoint_load_fsdp_tp():
    """The FSDP2 checkpoint loaded into FSDP2 over tensor parallelism (a (2, w/2) mesh)."""
    return checkpoint_load("fsdp_tp")


# ------------------------------------------------------------------ torchtitan (0.3)
def _titan(world_tp: tuple[int, int], seed: int):
    """torchtitan's Llama 3 debug model (one block) split by its own ``parallelize_llama``
    (``tp`` × FSDP2 over ``world`` ranks) and Scion from the example's container, with
    continuous norms in place of Sign (a float32 difference in a gradient near zero would
    flip a sign) and Newton–Schulz in float64."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import torchtitan.distributed.utils as dist_utils
    import torchtitan_scion as example

    example.cpu_settings()
    dist_utils.set_spmd_backend("partial_dtensor")
    dims = example.parallel_dims_for(*world_tp, 1)
    model, cfg = example.build_llama(dims, layers=1, seed=seed)
    groups = example.scion_groups(lr=2**-7)
    for group, norm in zip(groups, ("ColNorm", "RowNorm", None, None), strict=True):
        kwargs = group.optimizer_kwargs
        if norm is not None:
            kwargs["norm"], kwargs["norm_kwargs"] = norm, {}
        if kwargs["norm"] == "Spectral":
            kwargs["norm_kwargs"] = {**kwargs["norm_kwargs"], **F64_NS}
    config = example.ScionContainer.Config(param_groups=groups)
    return example, dims, model, cfg, config


def titan_training():
    """3 steps of torchtitan's model under FSDP2 × TP (2 × 2), each data rank its batch, with
    torchtitan's loss and warm-up scheduler, against one process on the whole batch (the same
    container on an unsplit copy); then a checkpoint of model and container in torchtitan's
    way (``dcp.save`` of its ``ModelWrapper`` and the container, FQN-keyed), one more step on
    seeded gradients, whose parameters a load into another layout must reproduce."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpointer.base import ModelWrapper
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer

    example, dims, model, cfg, config = _titan((WORLD, 2), seed=0)
    with torch.device("meta"):
        ref_model = cfg.build()
    ref_model.to_empty(device="cpu")
    with torch.no_grad():
        ref_model.init_weights(buffer_device=None)  # the rotary cache, not saved
    ref_model.load_state_dict({k: full(v) for k, v in model.state_dict().items()})
    opts = [config.build(model_parts=[m]) for m in (model, ref_model)]
    scheds = [LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=o, training_steps=10)
              for o in opts]  # fmt: skip
    start = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    loss_fn = CrossEntropyLoss.Config(global_vocab_size=cfg.vocab_size).build()
    data = dims.get_mesh("batch")
    B, L, shards = 2, 32, data.size()
    gen = torch.Generator().manual_seed(7)
    worst: dict[str, float] = {}
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    for _ in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (shards * B, L + 1), generator=gen)
        positions = torch.arange(L).expand(shards * B, L)
        mine = slice(B * data.get_local_rank(), B * data.get_local_rank() + B)
        total = torch.tensor(float(shards * B * L))
        loss, _ = loss_fn(model(tokens[mine, :-1], positions=positions[mine]),
                          tokens[mine, 1:], total)  # fmt: skip
        loss.backward()
        logits = ref_model(tokens[:, :-1], positions=positions)
        ref_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
        )
        (ref_loss / total).backward()
        for o, s in zip(opts, scheds, strict=True):
            o.step()
            s.step()
            o.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            diff = (full(p.detach()) - q.detach()).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
    moved = {n: (q.detach() - start[n]).abs().max().item()
             for n, q in ref_model.named_parameters()}  # fmt: skip
    out = Path(os.environ["SCION_TEST_CHECKPOINT"])
    dcp.save({"model": ModelWrapper(model), "optimizer": opts[0]}, checkpoint_id=str(out / "t"))
    _manual_step(model, opts[0], 3)
    expected = _full_state(model)  # a collective: every rank
    if RANK == 0:
        torch.save(expected, out / "titan_expected.pt")
    kinds = sorted({type(o).__name__ for o in opts[0]})
    return {"max_diff": worst, "placements": placements, "optimizers": kinds, "moved": moved,
            "lr": opts[0].optimizers[0].param_groups[0]["lr"]}  # fmt: skip


def titan_load():
    """torchtitan's checkpoint of :func:`titan_training` (FSDP2 × TP on 4 ranks) loaded into
    tensor parallelism alone on this world's ranks: the next step on the same seeded
    gradients gives the saving run's parameters."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpointer.base import ModelWrapper

    example, dims, model, cfg, config = _titan((WORLD, WORLD), seed=123)
    opt = config.build(model_parts=[model])
    out = Path(os.environ["SCION_TEST_CHECKPOINT"])
    dcp.load({"model": ModelWrapper(model), "optimizer": opt}, checkpoint_id=str(out / "t"))
    _manual_step(model, opt, 3)
    got, expected = _full_state(model), torch.load(out / "titan_expected.pt")
    return {
        "placements": {n: str(p.placements) for n, p in model.named_parameters()},
        "identical": {n: torch.equal(got[n], expected[n]) for n in expected},
        "max_diff": max((got[n] - expected[n]).abs().max().item() for n in expected),
    }


SCENARIOS = {f.__name__: f for f in [
    fsdp_parity, fsdp_parity_light, fsdp_parity_bf16_buffers, ddp_parity, hsdp_parity,
    fsdp_collectives, partial_gradients, nonfinite, fully_shard_training, ddp_no_sync,
    bad_layouts, fsdp_triton, fsdp_native, checkpoint_save, checkpoint_load, hybrid_shard_training,
    init_everywhere, tp_parity, tensor_parallel_training, tp_collectives, checkpoint_load_tp,
    ep_collectives, fsdp_tp_colwise_parity, fsdp_tp_rowwise_parity, fsdp_tp_training,
    fsdp_tp_collectives, checkpoint_load_fsdp_tp, hsdp_tp_colwise_parity, hsdp_tp_rowwise_parity,
    hsdp_tp_collectives, hsdp_tp_training, bucketed, titan_training, titan_load,
    fsdp_tp_mixed_collectives, ep_2d_collectives, fsdp_tp_grouped_collectives,
]}  # fmt: skip


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD)
    results = {}
    try:
        for name in names:
            if name in ("hsdp_parity", "hybrid_shard_training") and WORLD % 2:
                continue
            print(f"rank {RANK}: {name}", file=sys.stderr, flush=True)
            torch.manual_seed(0)
            results[name] = SCENARIOS[name]()
            dist.barrier()
    finally:
        (out_dir / f"rank{RANK}.json").write_text(json.dumps(results, default=str))
    dist.barrier()
    # Every rank is past the barrier with its results written: leave without tearing the gloo
    # groups down. Their teardown at exit can abort ("terminate called without an active
    # exception", seen once in CI on a 2-rank job whose results were all written), which would
    # fail a run that had nothing wrong with it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
