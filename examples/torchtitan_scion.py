"""Scion in torchtitan 0.3: its optimizer container, told one more name.

torchtitan builds its optimizers from ``OptimizersContainer.Config(param_groups=[...])``: each
``ParamGroupConfig`` names a regex over parameter names, an optimizer and its keyword
arguments, and the container asks ``_resolve_optimizer_factory(name)`` for the class, which
knows Adam, AdamW and DistMuon. A subclass that also knows Scion is the whole integration
(:class:`ScionContainer`); give the trainer's config ``optimizer=ScionContainer.Config(
param_groups=scion_groups())``. Scion takes every layout torchtitan makes (FSDP2, HSDP,
tensor parallelism, and those together), torchtitan's flat checkpoint format and its
learning-rate schedulers as they are.

Run as a script, it trains torchtitan's own Llama 3 debug model, split by torchtitan's own
``parallelize_llama`` (tensor parallelism, then FSDP2 or HSDP over it), with torchtitan's
loss and warm-up scheduler, on sequences that count up by a random stride::

    torchrun --standalone --nproc-per-node 4 examples/torchtitan_scion.py --tp 2
    torchrun --standalone --nproc-per-node 8 examples/torchtitan_scion.py --replicas 2 --steps 10

On CPUs (gloo) it changes four of torchtitan's settings that assume a GPU
(:func:`cpu_settings`). torchtitan 0.3's default ``spmd_backend="spmd_types"`` needs a newer
FSDP2 than PyTorch 2.13 has (its parameters stay plain tensors, which ``fully_shard`` refuses
there); this script uses ``"partial_dtensor"``, whose parameters are DTensors.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

import scion_kernels
from scion_kernels import RECIPES


class ScionContainer(OptimizersContainer):
    """torchtitan's optimizer container, which also builds ``Scion`` and ``ScionLight`` (one
    optimizer for all the groups that name it)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Any:
        if name in ("Scion", "ScionLight"):
            return getattr(scion_kernels, name)
        return OptimizersContainer._resolve_optimizer_factory(name)


def scion_groups(
    recipe: str = "gpt", lr: float | None = None, momentum: float | None = None
) -> list[ParamGroupConfig]:
    """``recipe``'s roles (``scion_kernels.RECIPES``) as torchtitan param groups for its
    decoder models, by parameter name: the token embedding is the input layer, ``lm_head``
    (``output`` in older models) the head, norm weights and biases vectors, every other
    parameter (attention, feed-forward, experts) hidden. ``lr`` and ``momentum`` default to
    the recipe's."""
    r = RECIPES[recipe]
    roles = [
        (r"(^|\.)tok_embeddings\.", r.input),
        (r"(^|\.)(lm_head|output)\.", r.head),
        (r"(norm\.weight|\.bias)$", r.vector),
        (r".*", r.hidden),
    ]
    return [
        ParamGroupConfig(
            pattern=pattern,
            optimizer_name="Scion",
            optimizer_kwargs={
                "lr": r.lr if lr is None else lr,
                "momentum": r.momentum if momentum is None else momentum,
                "norm": role.norm,
                "norm_kwargs": dict(role.norm_kwargs),
                "scale": role.scale,
                "lr_scale": role.lr_scale,
                "unconstrained": role.unconstrained,
            },
        )
        for pattern, role in roles
    ]


def cpu_settings() -> None:
    """torchtitan on CPUs: its device type (it falls back to ``"cuda"``), and, applied by
    :func:`build_llama`, attention that has a backward pass on CPUs (SDPA for FlexAttention)
    and plain sums in FSDP2's reduce-scatter (gloo has no ``PREMUL_SUM``)."""
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tools

    tools.device_type, tools.device_module = "cpu", torch.cpu
    parallel_dims.device_type = dist_utils.device_type = "cpu"


def build_llama(parallel_dims: Any, layers: int = 6, seed: int = 0) -> tuple[Any, Any]:
    """torchtitan's Llama 3 debug model (``layers`` blocks), parallelized by its own
    ``parallelize_llama`` over ``parallel_dims``, float32, initialized from ``seed``; also
    its config."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry, parallelize_llama
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    on_cpu = not torch.cuda.is_available()
    cfg = model_registry("debugmodel").model
    cfg.layers = cfg.layers[:layers]
    if on_cpu:  # FlexAttention has no backward pass on CPUs
        for layer in cfg.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    parallelism = ParallelismConfig(
        data_parallel_replicate_degree=parallel_dims.dp_replicate,
        data_parallel_shard_degree=parallel_dims.dp_shard,
        tensor_parallel_degree=parallel_dims.tp,
        spmd_backend="partial_dtensor",
    )
    set_llama3_sharding_config(cfg, enable_sp=parallelism.enable_sequence_parallel)
    with torch.device("meta"):
        model = cfg.build()
    model = parallelize_llama(
        model,
        parallel_dims=parallel_dims,
        training=TrainingConfig(mixed_precision_param="float32", mixed_precision_reduce="float32"),
        parallelism=parallelism,
        compile_config=CompileConfig(enable=False),
        ac_config=None,
        dump_folder="",
    )
    if on_cpu:  # gloo has no PREMUL_SUM, which a divide factor of 1 asks for
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cuda" if not on_cpu else "cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model, cfg


def parallel_dims_for(world: int, tp: int, replicas: int) -> Any:
    """torchtitan's ``ParallelDims``: ``replicas`` × FSDP × ``tp`` over ``world`` ranks, its
    mesh built."""
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims

    config = ParallelismConfig(
        data_parallel_replicate_degree=replicas,
        data_parallel_shard_degree=world // (tp * replicas),
        tensor_parallel_degree=tp,
        spmd_backend="partial_dtensor",
    )
    dims = ParallelDims.from_config(config, world)
    dims.build_mesh()
    return dims


def main(argv: list[str] | None = None) -> float:
    import torch.distributed as dist
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree")
    parser.add_argument("--replicas", type=int, default=1, help="HSDP replicas")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2**-9)
    args = parser.parse_args(argv)

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        cpu_settings()
    dist.init_process_group("gloo" if on_cpu else "nccl")
    torch.autograd.set_multithreading_enabled(False)  # as torchtitan's own launch does
    world, rank = dist.get_world_size(), dist.get_rank()
    dist_utils.set_spmd_backend("partial_dtensor")
    dims = parallel_dims_for(world, args.tp, args.replicas)
    model, cfg = build_llama(dims, args.layers)
    optimizers = ScionContainer.Config(param_groups=scion_groups(lr=args.lr)).build(
        model_parts=[model]
    )
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=args.steps
    )
    loss_fn = CrossEntropyLoss.Config(global_vocab_size=cfg.vocab_size).build()
    batch = dims.get_mesh("batch").get_local_rank() if dims.dp_enabled else 0
    gen = torch.Generator().manual_seed(1234 + batch)
    B, L, device = 2, 128, "cpu" if on_cpu else "cuda"
    # Every sequence counts up by a fixed stride: a pattern the model can learn.
    stride = torch.randint(1, 8, (args.steps, B, 1), generator=gen)
    start = torch.randint(0, cfg.vocab_size, (args.steps, B, 1), generator=gen)
    tokens = (start + stride * torch.arange(L + 1)) % cfg.vocab_size
    positions = torch.arange(L, device=device).expand(B, L)
    total = torch.tensor(float(B * L * dims.dp_replicate * dims.dp_shard))
    context = dist_utils.get_spmd_context(parallel_dims=dims, spmd_typechecking=False)
    loss = torch.zeros(())
    started = time.perf_counter()
    for step in range(args.steps):
        x, y = tokens[step, :, :-1].to(device), tokens[step, :, 1:].to(device)
        with context():
            loss, _ = loss_fn(model(x, positions=positions), y, total)
            loss.backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        loss = loss.detach().clone()
        if dims.dp_enabled:  # each data rank's partial sum
            dist.all_reduce(loss, group=dims.get_mesh("batch").get_group())
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - started:.1f} s on {world} ranks")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
    return loss.item()


if __name__ == "__main__":
    main()
