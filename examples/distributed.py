"""Train the quickstart's character-level GPT with Scion on several processes.

Launched with ``torchrun``; on CPUs the processes talk over gloo, on GPUs over NCCL (one GPU
per process)::

    torchrun --standalone --nproc-per-node 2 examples/distributed.py --mode fsdp
    torchrun --standalone --nproc-per-node 4 examples/distributed.py --mode hsdp
    torchrun --standalone --nproc-per-node 2 examples/distributed.py --mode ddp
    torchrun --standalone --nproc-per-node 2 examples/distributed.py --steps 100 --save ckpt
    torchrun --standalone --nproc-per-node 4 examples/distributed.py --steps 100 --resume ckpt

``fsdp``: ``fully_shard`` on every block and the whole model (parameters are ``Shard(0)``
DTensors); ``hsdp``: the same on a 2-D mesh, two replicas of a sharded model; ``ddp``:
``DistributedDataParallel`` with ``Scion(..., process_group=...)``. Every rank trains on its
own slice of each batch. In each mode every Spectral matrix is orthogonalized on one rank and
its update shared (``scion_kernels.distributed``). ``--save`` writes model and optimizer with
``torch.distributed.checkpoint`` at the end; ``--resume`` reads such a checkpoint, written at
any number of processes, before training.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from scion_kernels import Scion, param_groups
from scion_kernels.demo import GPT_RADII, TinyGPT, batches, char_data


def wrap(model: torch.nn.Module, mode: str, device: torch.device):
    """The model as ``mode`` distributes it, and the Scion options that go with it."""
    world = dist.get_world_size()
    if mode == "ddp":
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        return ddp, model, {"process_group": dist.group.WORLD}
    if mode == "hsdp":
        if world % 2:
            raise SystemExit("--mode hsdp needs an even number of processes")
        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replica", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model, {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["fsdp", "hsdp", "ddp"], default="fsdp")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--save", type=Path, default=None, help="checkpoint directory to write")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory to read")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    train(args, rank, world, device)
    # Everything that held the process groups (FSDP keeps its modules in reference cycles) is
    # collected now, while the interpreter is whole: gloo's threads must not be torn down
    # during interpreter exit, which aborts the process.
    gc.collect()
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    """Build, optionally resume, train and optionally save (on every rank)."""
    data, _, vocab = char_data()
    torch.manual_seed(0)
    model = TinyGPT(vocab, ctx=args.ctx).to(device)
    runner, inner, options = wrap(model, args.mode, device)
    groups = param_groups(inner, "gpt", overrides=GPT_RADII)  # the quickstart's radii
    opt = Scion(groups, lr=args.lr, momentum=0.1, **options)
    opt.init()  # the same values on every rank
    first = 0
    if args.resume is not None:
        state = {
            "model": get_model_state_dict(inner),
            "optim": get_optimizer_state_dict(inner, opt),
        }
        state["step"] = torch.zeros((), dtype=torch.long)
        dcp.load(state, checkpoint_id=str(args.resume))
        set_model_state_dict(inner, state["model"])
        set_optimizer_state_dict(inner, opt, state["optim"])
        first = int(state["step"])
    if rank == 0:
        print(
            f"{args.mode} on {world} processes ({dist.get_backend()}), "
            f"steps {first}..{first + args.steps - 1}, {args.batch}×{args.ctx} tokens per "
            f"process and step",
            flush=True,
        )

    t0 = time.perf_counter()
    last = first + args.steps
    stream = batches(data, last, args.batch * world, args.ctx, seed=1)
    for step, (x, y) in enumerate(stream):
        if step < first:
            continue  # the batches a resumed run has already seen
        frac = min(1.0, (last - step) / (0.4 * last))  # linear warm-down over the last 40%
        for g in opt.param_groups:
            g["lr"] = args.lr * frac
        mine = slice(rank * args.batch, (rank + 1) * args.batch)
        x, y = x[mine].to(device), y[mine].to(device)
        loss = F.cross_entropy(runner(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == last - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"  step {step:4d}  train loss {mean.item() / world:.3f}", flush=True)
    elapsed = (time.perf_counter() - t0) / max(1, args.steps)
    if rank == 0:
        print(f"{1e3 * elapsed:.1f} ms per step", flush=True)
    if args.save is not None:
        state = {
            "model": get_model_state_dict(inner),
            "optim": get_optimizer_state_dict(inner, opt),
            "step": torch.tensor(last),
        }
        dcp.save(state, checkpoint_id=str(args.save))
        if rank == 0:
            print(f"saved step {last} to {args.save}", flush=True)


if __name__ == "__main__":
    main()
