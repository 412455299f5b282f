"""Parallelism applied from outside the model (torchtitan's split): process group, device mesh, TP, FSDP2 / DDP.

The world is a 2-D mesh ("dp", "tp"). Tensor parallel shards each block's attention (q/k/v column-wise, o
row-wise: heads split across ranks) and its dense MLP (gate/up column-wise, down row-wise) with DTensor; the
embeddings, norms and LM head stay replicated. For the MoE model only attention is sharded: its experts are
stacked 3-D weights indexed per expert, which DTensor's column/row styles cannot split, and the natural split
for them is expert parallel, not tensor parallel; every TP rank runs the (replicated) experts on the same input.
Data parallel then wraps the result: FSDP2 (`fully_shard` per block, then the root, so tied embedding and LM
head share one group) over the "dp" dimension, or DDP when there is no tensor parallel.
Everything runs on CPU with gloo as on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.train.config import ParallelConfig
from glassbox.models.transformer import ModelConfig, Transformer


@dataclass
class World:
    """Where this process sits: global rank, its data-parallel coordinates, and the device it computes on."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_size: int
    device: torch.device
    mesh: "torch.distributed.device_mesh.DeviceMesh | None"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self) -> "dist.ProcessGroup | None":
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dp_size > 1 else None


def pick_device(cfg: ParallelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise GlassboxError("parallel.device is cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_world(cfg: ParallelConfig) -> World:
    """Join the process group torchrun (or a test's spawn) set up, and build the (dp, tp) mesh."""
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    elif world_size > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
    rank = dist.get_rank() if world_size > 1 else 0
    tp = cfg.tensor_parallel
    if world_size % tp:
        raise ConfigError(f"parallel.tensor_parallel ({tp}) must divide the world size ({world_size})")
    if world_size == 1:
        return World(0, 1, 0, 1, 1, device, None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    return World(rank, world_size, mesh["dp"].get_local_rank(), world_size // tp, tp, device, mesh)


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    for name in ("num_heads", "num_kv_heads") + (() if cfg.is_moe else ("intermediate_size",)):
        if getattr(cfg, name) % tp:
            raise ConfigError(f"model.{name} ({getattr(cfg, name)}) must divide by parallel.tensor_parallel ({tp})")


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
    }
    if not model.config.is_moe:
        plan.update({
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        })
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Keep only each block's input for the backward and recompute the rest of its forward there.

    The block's forward is replaced on the instance, not wrapped in a module as torch's `checkpoint_wrapper`
    does, so parameter names and state-dict keys stay `layers.N.<...>` and checkpoints load either way; compile
    and FSDP2 then apply to the block as to any other. Non-reentrant checkpointing recomputes the same values,
    so losses and gradients are those without it.
    """
    from torch.utils.checkpoint import checkpoint

    def checkpointed(forward):
        # A frame of our own around the call: `checkpoint` disables dynamo when a compiled frame does not call
        # it, so `partial(checkpoint, forward)` as the forward would leave the compiled block running eagerly.
        @functools.wraps(forward)
        def run(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    for block in model.layers:
        block.forward = checkpointed(block.forward)


def parallelize(model: Transformer, cfg: ParallelConfig, world: World, bf16: bool) -> nn.Module:
    """TP, activation checkpointing, compile, then data parallel; returns the module to train (the model itself
    unless DDP wraps it). A model built on the meta device stays there (`glassbox.train.model_init`)."""
    if not any(p.is_meta for p in model.parameters()):
        model.to(world.device)
    if world.tp_size > 1:
        check_tensor_parallel(model.config, world.tp_size)
        apply_tensor_parallel(model, world.mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        for block in model.layers:
            block.compile()
    if world.dp_size == 1:
        return model
    if cfg.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=world.dp_group)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=world.mesh["dp"], mp_policy=mp)
    fully_shard(model, mesh=world.mesh["dp"], mp_policy=mp)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the data-parallel gradient reduction on all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def _placement_key(p: torch.Tensor) -> tuple:
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        # The mesh by its ranks and dimension names, not by object: each `mesh["dp"]` slice is a new object,
        # and keying by id gave every FSDP2 block its own groups, so a checkpoint from one rank (two groups)
        # could not load into two (one pair per block).
        mesh = p.device_mesh
        return ("dtensor", mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist()),
                tuple(str(pl) for pl in p.placements))
    return ("tensor",)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only, and one group per kind of tensor (plain, or DTensor per mesh and
    placement), because foreach/fused optimizer kernels cannot mix plain tensors and DTensors in one list."""
    groups: dict[tuple, dict] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2
        key = (decay,) + _placement_key(p)
        groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0})["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def grad_sq_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm of the gradients over every shard, on the device.

    Sharded DTensor gradients contribute their local sum of squares, reduced once per mesh dimension they are
    sharded on; replicated and plain gradients are identical on every rank and count once.
    """
    from torch.distributed.tensor import DTensor

    buckets: dict[tuple, list[torch.Tensor]] = {}
    meshes = {}
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            # Every non-replicated dimension splits the gradient (FSDP2 over TP uses _StridedShard, not a Shard).
            dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            meshes[id(g.device_mesh)] = g.device_mesh
            buckets.setdefault((id(g.device_mesh), dims), []).append(g.to_local())
        else:
            buckets.setdefault((None, ()), []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for (mesh_id, dims), tensors in buckets.items():
        # One fused multi-tensor kernel for all the norms, rather than three small kernels per parameter.
        sq = torch.stack(torch._foreach_norm(tensors, 2.0)).float().pow(2).sum()
        for d in dims:
            dist.all_reduce(sq, group=meshes[mesh_id].get_group(d))
        total += sq
    return total


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients to `max_norm` when their global `norm` is above it (0: no clipping)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0 and grads:
        # The scale stays on the device, so clipping adds no host sync to the step; a factor of exactly 1 (norm
        # under the limit) leaves the gradients bit-identical.
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], scale)


@torch.no_grad()
def local_grad_sq_norms(model: nn.Module) -> torch.Tensor:
    """Per-parameter squared L2 norms of this rank's gradient as accumulated so far, before any data-parallel
    reduction: a vector over the trainable parameters in `model.parameters()` order (0 for one without a
    gradient), so a caller can weight each parameter's share (Pollux preconditions by Adam's second moment).

    With gradient sync off (every micro-batch but a step's last), plain and DDP parameters hold the local sum
    in `.grad`; FSDP2 keeps it unsharded beside each sharded parameter, which only its parameter groups reach
    (the one place glassbox reads FSDP2 internals). One fused norm kernel, no collective, no host sync.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    unsharded: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else []:
                g = fp.unsharded_accumulated_grad
                g = g if g is not None else fp._unsharded_param.grad
                if g is not None:
                    unsharded[id(fp.sharded_param)] = g
    params = [p for p in model.parameters() if p.requires_grad]
    present, grads = [], []
    for i, p in enumerate(params):
        g = unsharded.get(id(p)) if unsharded else p.grad
        if g is not None:
            present.append(i)
            grads.append(g.to_local() if isinstance(g, DTensor) else g)
    if not grads:
        return torch.zeros(len(params))
    sq = torch.stack(torch._foreach_norm(grads, 2.0)).float().pow(2)
    if len(grads) == len(params):
        return sq
    norms = torch.zeros(len(params), dtype=sq.dtype, device=sq.device)
    norms[torch.tensor(present, device=sq.device)] = sq
    return norms
