"""Scion across processes (gloo, CPU): DDP, FSDP2 and hybrid steps against one process,
uneven and empty shards, missing and non-finite gradients, collective counts and volume, and
distributed checkpoints saved at one world size and loaded at others.

Each job starts ``tests/distributed/worker.py`` once per rank, runs several scenarios in one
process group and writes what it measured per rank; a job that runs past its time limit is
killed and fails the test. Each job runs once per session and its tests read its results.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORKER = Path(__file__).parent / "distributed" / "worker.py"
ROOT = Path(__file__).parent.parent
TIME_LIMIT_S = int(os.environ.get("SCION_TEST_TIME_LIMIT", 300))

PARITY = ["fsdp_parity", "fsdp_parity_light", "fsdp_parity_bf16_buffers", "ddp_parity"]
#: FSDP2 over tensor parallelism on a (data, tensor) mesh: tensors split on both mesh dims.
FSDP_TP = [
    "fsdp_tp_colwise_parity", "fsdp_tp_rowwise_parity", "fsdp_tp_training", "fsdp_tp_collectives",
    "fsdp_tp_mixed_collectives", "ep_2d_collectives", "fsdp_tp_grouped_collectives",
]  # fmt: skip
#: HSDP over tensor parallelism on a (replicate, shard, tensor) mesh of 8 ranks.
HSDP_TP = [
    "hsdp_tp_colwise_parity", "hsdp_tp_rowwise_parity", "hsdp_tp_collectives", "hsdp_tp_training",
]  # fmt: skip
#: Groups whose LMO reduces across shards when the weights are split along their columns
#: (tensor parallelism's Shard(1)): rows span the shards.
TP_REDUCED = {
    "ColNorm(transpose=True)@6x10", "ColNorm(normalized=True,transpose=True)@6x10",
    "RowNorm()@6x10", "Auto()@6", "BiasRMS()@10",
}  # fmt: skip
OTHERS = ["fsdp_collectives", "partial_gradients", "nonfinite", "fully_shard_training",
          "ddp_no_sync", "bad_layouts", "init_everywhere", "fsdp_triton",
          "fsdp_native", "tp_parity", "tensor_parallel_training", "tp_collectives",
          "ep_collectives", "bucketed"]  # fmt: skip
# Groups whose LMO needs a sum of squares across shards (one float64 all-reduce): they agree
# with one process within float32 rounding of that norm, not bit for bit.
REDUCED = {
    "Auto()@6", "ColNorm()@6x10", "ColNorm(normalized=True,transpose=True)@6x10",
    "RowNorm(transpose=True)@6x10", "BiasRMS()@10",
}  # fmt: skip
# Groups orthogonalized by Newton–Schulz (float32 here) on an owner: the same arithmetic as one
# process, but CPU BLAS kernels may round a product differently by batch and memory layout, so
# within float32 rounding too.
ORTHOGONALIZED = {
    "Spectral()@5x8", "Spectral(batch_dims=1)@5x6x4", "Auto()@4x3x3x3",
    "Spectral(split=(4, 6),transpose=True)@6x10", "SpectralConv(groups=2)@6x2x3",
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, scenarios: list[str], out: Path, env: dict[str, str] | None = None):
    """Run ``scenarios`` on ``world`` ranks; each rank's results (a list, by rank)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        rank_env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out), *scenarios],
                env=rank_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + TIME_LIMIT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        tails = "\n".join(
            f"--- rank {r} (exit {c}):\n" + (out / f"log{r}.txt").read_text()[-3000:]
            for r, c in enumerate(codes)
        )
        pytest.fail(f"{world}-rank job {scenarios} failed or passed {TIME_LIMIT_S} s:\n{tails}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _build_emulation() -> dict[str, str]:
    """Build the host emulation of the native module here, once, so the ranks load it from its
    cache; the environment that tells them it is there (empty when it cannot be built)."""
    sys.path.insert(0, str(Path(__file__).parent / "native"))
    try:
        import emulated
    finally:
        sys.path.pop(0)
    if emulated.unavailable_reason() is not None:
        return {}
    emulated.build()
    return {"SCION_TEST_EMULATED": "1"}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The 2- and 4-rank jobs, run once each, on first use."""
    done: dict[int, list[dict]] = {}
    env = _build_emulation()

    def get(world: int) -> list[dict]:
        if world not in done:
            scenarios = PARITY + OTHERS
            if world == 8:  # only the 3-D mesh: (2, 2, 2)
                scenarios = HSDP_TP
            elif world % 2 == 0:  # a (2, world/2) mesh
                scenarios += ["hsdp_parity", "hybrid_shard_training", *FSDP_TP]
            out = tmp_path_factory.mktemp(f"world{world}")
            done[world] = launch(world, scenarios, out, env)
        return done[world]

    return get


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", [*PARITY, "hsdp_parity"])
def test_steps_match_one_process(jobs, world, scenario):
    """Three steps of every norm, distributed, against the same steps in one process: equal
    bits, except the norms that reduce across shards and the orthogonalized ones (within
    float32 rounding). Shapes include 5 rows over 4 ranks (2, 2, 1, 0 rows), tall, wide, a
    conv and stacked experts."""
    results = jobs(world)
    for rank, result in enumerate(results):
        groups = result[scenario]
        assert len(groups) == 14, groups.keys()  # every group of worker.GROUPS
        for name, got in groups.items():
            sharded = scenario != "ddp_parity" and not (scenario == "hsdp_parity" and world == 2)
            if (sharded and name in REDUCED) or name in ORTHOGONALIZED:
                assert got["max_diff"] <= 1e-6, (rank, name, got)
            else:
                assert got["exact"], (rank, name, got)


def _assert_parity(results: list[dict], scenario: str, rounded: set[str]) -> None:
    """Every group of ``scenario`` on every rank: within 1e-6 of one process where it is in
    ``rounded``, else bit for bit."""
    for rank, result in enumerate(results):
        groups = result[scenario]
        assert len(groups) == 14, groups.keys()  # every group of worker.GROUPS
        for name, got in groups.items():
            if name in rounded:
                assert got["max_diff"] <= 1e-6, (rank, name, got)
            else:
                assert got["exact"], (rank, name, got)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_one_process(jobs, world):
    """Tensor parallelism on its own mesh (weights ``Shard(1)``, as ``RowwiseParallel`` splits
    them; vectors ``Shard(0)``): three steps of every norm against one process. Each Spectral
    matrix is gathered whole on its owner along the split dim; groups whose rows span the
    shards take the float64 sums of squares over them (within float32 rounding); Sign and the
    groups whole on every shard step bit for bit."""
    _assert_parity(jobs(world), "tp_parity", TP_REDUCED | ORTHOGONALIZED)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "scenario",
    ["fsdp_collectives", "tp_collectives", "fsdp_tp_collectives", "fsdp_tp_mixed_collectives"],
)
def test_fsdp_collectives_and_volume(jobs, world, scenario):
    """A Spectral-only step on matrices split along their rows (FSDP), their columns (tensor
    parallelism), or both dims of a (data, tensor) mesh (FSDP2 over tensor parallelism, one
    layout or column- and row-wise ones mixed in the group): one all-reduce (the agreement)
    and two all_to_all_single (gather to owners, scatter back).
    Over the ranks, the elements passed to all_to_all sum to exactly 2·P (each rank about
    2·P/w; the owner balance decides the spread)."""
    results = [r[scenario] for r in jobs(world)]
    P = results[0]["P"]
    for r in results:
        assert r["counts"] == {"c10d.allreduce_": 1, "c10d.alltoall_base_": 2}
        assert r["calls"] == 2
        assert r["sent"] <= 1.5 * 2 * P / world, r
    assert sum(r["sent"] for r in results) == 2 * P


@pytest.mark.parametrize("world", [2, 4])
def test_grouped_norms_on_a_2d_mesh_send_sums_only(jobs, world):
    """Under FSDP2 over tensor parallelism, Sign steps with the agreement all-reduce only, and
    ColNorm adds one all-reduce of its columns' sums (no all_to_all for either)."""
    for r in jobs(world):
        got = r["fsdp_tp_grouped_collectives"]
        assert got["Sign"]["counts"] == {"c10d.allreduce_": 1}, got
        assert got["ColNorm"]["counts"] == {"c10d.allreduce_": 2}, got
        assert got["Sign"]["calls"] == got["ColNorm"]["calls"] == 0


@pytest.mark.parametrize("world", [2, 4])
def test_buckets_pipeline_and_step_as_one(jobs, world):
    """Every tensor its own bucket, the buckets' round trips pipelined: every norm steps as
    without buckets (FSDP2, and FSDP2 over tensor parallelism), and a Spectral-only step
    makes two all_to_all_single per bucket (4 matrices: 8) passing ``2·P`` elements in all."""
    for r in jobs(world):
        _assert_parity([r["bucketed"]], "fsdp", REDUCED | ORTHOGONALIZED)
        _assert_parity([r["bucketed"]], "fsdp_tp", REDUCED | ORTHOGONALIZED)
    for key in ("collectives", "fsdp_tp_collectives"):
        results = [r["bucketed"][key] for r in jobs(world)]
        for r in results:
            assert r["counts"] == {"c10d.allreduce_": 1, "c10d.alltoall_base_": 8}, r
            assert r["calls"] == 8
        assert sum(r["sent"] for r in results) == 2 * results[0]["P"]


@pytest.mark.parametrize("world", [2, 4])
def test_experts_step_without_communication(jobs, world):
    """Stacked experts split along the expert dim (expert parallelism, ``batch_dims=1``): each
    rank orthogonalizes the whole experts it holds, so the step's one collective is the
    agreement all-reduce; their steps equal one process's (``fsdp_parity``'s stacked group).
    The same split on both dims of a 2-D mesh (``(Shard(0), Shard(0))``: FSDP2 over expert
    parallelism) and under FSDP2 over tensor parallelism (``fsdp_tp_colwise_parity``'s
    stacked group) keeps whole experts on every rank: no exchange either."""
    for r in jobs(world):
        for scenario in ("ep_collectives", "ep_2d_collectives"):
            assert r[scenario]["counts"] == {"c10d.allreduce_": 1}, r[scenario]
            assert r[scenario]["calls"] == 0


@pytest.mark.parametrize("world", [2, 4])
def test_gradient_on_some_ranks_only(jobs, world):
    """A gradient on rank 0 only, or on none: skipped on every rank (warned where it exists),
    the rest steps, no rank hangs."""
    for rank, r in enumerate(jobs(world)):
        got = r["partial_gradients"]
        assert got["changed"] == [True, False, False]
        assert got["warned"] == (rank == 0)


@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_on_one_shard(jobs, world):
    """A NaN in the last rank's shard: every rank skips ("skip") or raises naming the
    parameter ("raise"); no parameter changes anywhere."""
    for r in jobs(world):
        got = r["nonfinite"]
        assert got["skip"] == {"unchanged": True, "raised": "", "skipped": 1}
        assert got["raise"]["unchanged"]
        assert "parameter 0 of param group 1 (shape (8, 4))" in got["raise"]["raised"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "scenario", ["fully_shard_training", "hybrid_shard_training", "ddp_no_sync"]
)
def test_training_matches_one_process(jobs, world, scenario):
    """Real backward passes: an MLP under fully_shard (1-D mesh, and 2-D for hybrid sharding;
    each rank its slice of the batch) and under DDP with no_sync accumulation, against one
    process on the whole batch; the gradient averaging order differs, so within float32
    rounding."""
    for r in jobs(world):
        assert r[scenario]["max_diff"] <= 1e-5, r[scenario]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", FSDP_TP[:2])
def test_fsdp_over_tensor_parallel_matches_one_process(jobs, world, scenario):
    """Tensors split on both dims of a (data, tensor) mesh, as FSDP2 over tensor parallelism
    lays them out: ``(_StridedShard(0), Shard(0))`` (column-wise weights and biases) or
    ``(Shard(0), Shard(1))`` (row-wise weights; their biases ``(Shard(0), Replicate())``).
    Each orthogonalized tensor is gathered whole on its owner and its update sent back; the
    grouped norms all-reduce their groups' sums of squares, indexed by group; Sign sends
    nothing. Every norm steps as in one process: bit for bit, except the orthogonalized norms
    and the groups whose sums cross ranks (within float32 rounding: those split along rows,
    and under ``Shard(1)`` those split along columns too)."""
    _assert_parity(jobs(world), scenario, _spanning(scenario) | ORTHOGONALIZED)


def _spanning(scenario: str) -> set[str]:
    """The groups whose sums of squares cross ranks in ``scenario``: rows are split in every
    layout here, columns too where a mesh dim splits them (``Shard(1)``)."""
    return REDUCED | TP_REDUCED if "rowwise" in scenario else REDUCED


@pytest.mark.parametrize("scenario", HSDP_TP[:2])
def test_hsdp_over_tensor_parallel_matches_one_process(jobs, scenario):
    """Tensors laid out on a 3-D (replicate, shard, tensor) mesh, as HSDP over tensor
    parallelism makes them: ``(Replicate(), _StridedShard(0), Shard(0))``, or ``(Replicate(),
    Shard(0), Shard(1))`` weights with ``(Replicate(), Shard(0), Replicate())`` vectors. Each
    orthogonalized tensor is gathered from one replica onto its owner and its update sent to
    every rank; the grouped norms' sums are added from one replica only. Every norm steps as
    in one process (bit for bit, except as in the 2-D case)."""
    _assert_parity(jobs(8), scenario, _spanning(scenario) | ORTHOGONALIZED)


def test_hsdp_over_tensor_parallel_collectives(jobs):
    """A Spectral-only step on the 3-D mesh: one all-reduce, two all_to_all_single; one
    replica sends each element to its owner (``P`` in all) and every rank gets its part of
    the update back (``2·P``, two replicas), so ``3·P`` elements pass, not ``4·P``."""
    results = [r["hsdp_tp_collectives"] for r in jobs(8)]
    P = results[0]["P"]
    for r in results:
        assert r["counts"] == {"c10d.allreduce_": 1, "c10d.alltoall_base_": 2}
        assert r["calls"] == 2
    assert sum(r["sent"] for r in results) == 3 * P


def test_hsdp_over_parallelize_module_trains_as_one_process(jobs):
    """torchtitan's 3-D layout: ``parallelize_module`` on the tensor dim, ``fully_shard`` on
    the (replicate, shard) dims; each of the 4 data ranks its slice of the batch: 5 steps
    within float32 rounding of one process."""
    for r in jobs(8):
        got = r["hsdp_tp_training"]
        assert got["placements"]["0.weight"] == (
            "(Replicate(), _StridedShard(dim=0, sf=2), Shard(dim=0))"
        )
        assert got["placements"]["2.weight"] == "(Replicate(), Shard(dim=0), Shard(dim=1))"
        assert got["placements"]["2.bias"] == "(Replicate(), Shard(dim=0), Replicate())"
        assert got["max_diff"] <= 1e-5, got


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_over_parallelize_module_trains_as_one_process(jobs, world):
    """torchtitan's layout: ``parallelize_module`` on the tensor dim of a (data, tensor)
    mesh, then ``fully_shard`` on the data dim, each data rank its slice of the batch: 5
    steps within float32 rounding of one process."""
    for r in jobs(world):
        got = r["fsdp_tp_training"]
        if world == 4:
            assert got["placements"]["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        assert got["placements"]["2.weight"] == "(Shard(dim=0), Shard(dim=1))"
        assert got["max_diff"] <= 1e-5, got


@pytest.mark.parametrize("world", [2, 4])
def test_parallelize_module_trains_as_one_process(jobs, world):
    """An MLP split by torch's own ``parallelize_module`` (``ColwiseParallel`` then
    ``RowwiseParallel``: every placement a 1-D tensor-parallel plan makes), every rank on the
    whole batch: 5 steps within float32 rounding of one process."""
    for r in jobs(world):
        got = r["tensor_parallel_training"]
        assert got["placements"] == {
            "0.weight": "(Shard(dim=0),)", "0.bias": "(Shard(dim=0),)",
            "2.weight": "(Shard(dim=1),)", "2.bias": "(Replicate(),)",
        }  # fmt: skip
        assert got["max_diff"] <= 1e-5, got


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_init_agrees_across_ranks(jobs, world, mode):
    """opt.init() seeded differently per rank gives every rank the same parameters, each on
    its sphere: spectral norm ρ·√(d_out/d_in) for Spectral (the plain group: ρ = 2; the
    "mlp" recipe's 32×12 input layer: ρ = 1, max(1, s))."""
    results = [r["init_everywhere"][mode] for r in jobs(world)]
    assert all(r == results[0] for r in results)
    if mode == "ddp":
        assert results[0]["spectral"] == pytest.approx([2 * (32 / 12) ** 0.5, 2 * (5 / 32) ** 0.5])
    else:
        assert results[0]["spectral"][0] == pytest.approx((32 / 12) ** 0.5, rel=1e-5)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", ["fsdp_triton", "fsdp_native"])
def test_owners_use_the_kernels_newton_schulz(jobs, world, scenario):
    """backend="triton" (Triton's interpreter) and "cuda" (the native kernels in the host
    emulation) under FSDP: each matrix's Newton–Schulz runs once, on its owner, through the
    kernels; the change of every parameter is as close to the reference's as the backend's
    single-process fused step is (up to twice that, or 1e-6)."""
    results = [r[scenario] for r in jobs(world)]
    if "skipped" in results[0]:
        pytest.skip(results[0]["skipped"])
    calls = sorted(tuple(c) for r in results for c in r["polar_calls"])
    # Each matrix once, oriented wide (13×7 as 7×13), as the reference orients them.
    assert calls == sorted([(1, 5, 8), (1, 7, 13), (1, 16, 16), (1, 3, 20), (1, 4, 27)])
    for r in results:
        assert r["distributed"] <= max(2 * r["fused"], 1e-6), r


@pytest.mark.parametrize("world", [2, 4])
def test_unsupported_layouts_raise(jobs, world):
    """Refused at construction on every rank: a placement no engine gives a parameter, a
    backend that cannot run there, and a local tensor that is not what its placements say
    (wrong on the last rank only; the others are told by the all-reduce and raise too)."""
    results = [r["bad_layouts"] for r in jobs(world)]
    got = results[0]
    assert "placed as Shard(d), _StridedShard and Replicate()" in got["partial"], got
    assert "got (Partial(sum),)" in got["partial"]
    assert "backend 'cuda' (param group 0)" in got["cuda"]
    for rank, r in enumerate(results):
        last = rank == world - 1
        assert ("holds 3 along dim 0" if last else "on another rank") in r["short_1d"], r
        assert ("holds (3, " if last else "on another rank") in r["short_2d"], r


@pytest.mark.parametrize("saved_at", [2, 4])
def test_checkpoint_across_world_sizes(tmp_path, saved_at):
    """Save with torch.distributed.checkpoint at 2 or 4 ranks (FSDP2), load under FSDP2 at
    the other count, in one process (a plain model), at 2 ranks in the tensor-parallel layout
    (weights split along their columns or rows by ``parallelize_module``) and at 4 in FSDP2
    over that: the next step gives the same bits as the saving run's."""
    env = {"SCION_TEST_CHECKPOINT": str(tmp_path)}
    saved = launch(saved_at, ["checkpoint_save"], tmp_path / "save", env)
    keys = [r["checkpoint_save"]["state_keys_before_first_step"] for r in saved]
    assert keys[0] and all(k == keys[0] for k in keys)  # state exists up front, same keys
    for world in (6 - saved_at, 1):
        for r in launch(world, ["checkpoint_load"], tmp_path / f"load{world}", env):
            assert r["checkpoint_load"]["identical"], r
    # Into other layouts: the first two Linears split by parallelize_module on 2 ranks, and
    # fully_shard over that on a (2, 2) mesh of 4 ranks.
    for r in launch(2, ["checkpoint_load_tp"], tmp_path / "load_tp", env):
        assert r["checkpoint_load_tp"]["identical"], r
    for r in launch(4, ["checkpoint_load_fsdp_tp"], tmp_path / "load_fsdp_tp", env):
        assert r["checkpoint_load_fsdp_tp"]["identical"], r


def test_process_group_needs_init():
    from scion_kernels import Scion

    with pytest.raises(ValueError, match="not initialized"):
        Scion([torch.nn.Parameter(torch.zeros(3, 3))], process_group=object())


def test_owner_balance_and_shard_rows():
    from scion_kernels.distributed import owner_slots, shard_rows

    assert shard_rows(5, 4) == [2, 2, 1, 0]
    assert shard_rows(8, 4) == [2, 2, 2, 2]
    assert shard_rows(1, 3) == [1, 0, 0]
    assert shard_rows(0, 2) == [0, 0]
    # Longest first onto the least-loaded slot: 9 → 0, 5 → 1, 4 → 1, 3 → 0, 1 → 1.
    assert owner_slots([3, 9, 4, 5, 1], 2) == [0, 0, 1, 1, 1]
    assert owner_slots([1.0, 1.0, 1.0], 4) == [0, 1, 2]


class _Grid:
    """What :func:`index_lists` reads of a ``DeviceMesh``: its rank grid and dim sizes."""

    def __init__(self, *shape: int) -> None:
        self.mesh = torch.arange(math.prod(shape)).view(shape)

    def size(self, m: int) -> int:
        return self.mesh.shape[m]


def test_index_lists_pick_what_each_rank_holds():
    """Per-dim index lists against the elements each rank holds, found by splitting a tensor
    of element numbers with the placements themselves (each mesh dim left to right), on odd
    shapes, 2-D and 3-D meshes; and what an owner keeps for a Llama-70B MLP matrix under
    FSDP2 × TP 8 on 64 ranks: its index lists, not one number per element."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from scion_kernels.distributed import _rank_indices, index_lists

    cases = [
        ((2, 2), (7, 129), (_StridedShard(0, split_factor=2), Shard(0))),
        ((2, 2), (7, 129), (Shard(0), Shard(1))),
        ((2, 3), (13, 5, 4), (Shard(1), _StridedShard(0, split_factor=3))),
        ((2, 2, 2), (9, 6), (Replicate(), _StridedShard(0, split_factor=2), Shard(0))),
        ((2, 2, 2), (9,), (Replicate(), Shard(0), Replicate())),
    ]
    for grid_shape, shape, placements in cases:
        grid = _Grid(*grid_shape)
        numbers = torch.arange(math.prod(shape)).view(shape)
        expected = {(): numbers}
        for m, pl in enumerate(placements):
            n = grid.size(m)
            step = {}
            for coord, t in expected.items():
                splits = isinstance(pl, (Shard, _StridedShard))  # not a Shard in torch 2.13
                parts = pl._split_tensor(t, n, with_padding=False)[0] if splits else [t] * n
                step.update({(*coord, c): parts[c] for c in range(n)})
            expected = step
        got = index_lists(shape, grid, placements)
        for coord, t in expected.items():
            ix = _rank_indices(shape, grid, placements, torch.device("cpu"))
            rank = int(grid.mesh[coord])
            assert torch.equal(numbers[ix[rank]], t), (shape, placements, coord)
            assert tuple(len(i) for i in got[rank]) == tuple(t.shape)
    grid, shape = _Grid(8, 8), (28672, 8192)
    ranks = _rank_indices(shape, grid, (_StridedShard(0, split_factor=8), Shard(0)), "cpu")
    kept = {id(t): t.numel() for ix in ranks for t in ix}
    assert sum(kept.values()) == 28672 + 8192  # every row's index once, one shared column list


def _torchrun(nproc: int, *args: str, example: str = "distributed.py") -> str:
    example = str(ROOT / "examples" / example)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", example, *args]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=TIME_LIMIT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd} passed {TIME_LIMIT_S} s:\n{e.stdout}\n{e.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done.stdout


def test_example_trains_saves_and_resumes(tmp_path):
    """examples/distributed.py under torchrun: FSDP2 on 2 processes saves a checkpoint, DDP on
    2 processes resumes from it at the saved step with the loss where it was left."""
    ckpt = str(tmp_path / "ckpt")
    out = _torchrun(2, "--mode", "fsdp", "--steps", "12", "--batch", "4", "--save", ckpt)
    losses = [float(line.split()[-1]) for line in out.splitlines() if "train loss" in line]
    assert "saved step 12" in out and losses[-1] < losses[0], out
    out = _torchrun(2, "--mode", "ddp", "--steps", "2", "--batch", "4", "--resume", ckpt)
    resumed = [float(line.split()[-1]) for line in out.splitlines() if "train loss" in line]
    assert "steps 12..13" in out and "step   12" in out, out
    assert resumed[0] < losses[0] - 0.3, (losses, resumed)  # not a fresh start
