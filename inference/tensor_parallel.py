"""Tensor-parallel serving across the GPUs (or CPU processes) of one host: Megatron-style sharding, one leader.

Why this shape: the engine's scheduler, sampler, proposer and server stay single-process on rank 0, as they
are without parallelism; only the model runner is replicated. Rank 0 sends each runner call (a step's batch,
a KV move) to the workers over a gloo control group, then makes the same call itself; every rank runs the
forward on its shard, and the two all-reduces per layer leave every rank with the same hidden states and the
same logits. Workers keep no request state, so nothing on them can disagree with the leader's view.

Sharding (`shard_model`): each rank keeps a contiguous slice of the query heads and the matching slice of KV
heads (so grouped-query attention stays local), and a slice of the MLP's hidden units; the attention output and
MLP down projections become row-parallel layers that all-reduce their partial sums. Embeddings, norms and the
LM head stay whole on every rank. Its KV cache holds only its own KV heads: the pool per GPU shrinks by the
tensor-parallel size, or holds that many times more tokens.

Start-up is symmetric: every rank loads the model directory, shards it, and builds an engine, so the memory
profile forward and any CUDA graph capture, which run collectives, happen on all ranks together; the ranks then
agree on the smallest KV pool any of them can hold. Dense Llama models only (not MoE, not SwiftKV) for now.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from glassbox.config import ConfigError
from glassbox.models.transformer import SwiGLU, Transformer


class RowParallelLinear(nn.Module):
    """A linear layer holding a slice of the input features: each rank's partial product, summed over ranks."""

    def __init__(self, weight: torch.Tensor, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


def check_shardable(model: Transformer, world: int, where: str = "engine.tensor_parallel_size") -> None:
    """A clear error, naming the sizes, for a model that `world` ranks cannot split evenly."""
    from glassbox.models.swiftkv import SwiftKVTransformer

    cfg = model.config
    if cfg.is_moe:
        raise ConfigError(f"{where}: {world} ranks, but tensor-parallel serving covers dense models; this one is a "
                          f"mixture of experts ({cfg.num_experts} experts)")
    if isinstance(model, SwiftKVTransformer):
        raise ConfigError(f"{where}: tensor-parallel serving of SwiftKV models is not supported")
    for name, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP hidden units", cfg.intermediate_size)):
        if n % world:
            raise ConfigError(f"{where}: {world} ranks cannot split the model's {n} {name} evenly")


def shard_model(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep this rank's slice of every layer's heads and MLP units, in place; see the module docstring."""
    check_shardable(model, world)
    cfg = model.config
    hd = cfg.head_dim
    q_rows = slice(rank * cfg.num_heads // world * hd, (rank + 1) * cfg.num_heads // world * hd)
    kv_rows = slice(rank * cfg.num_kv_heads // world * hd, (rank + 1) * cfg.num_kv_heads // world * hd)
    mlp_rows = slice(rank * cfg.intermediate_size // world, (rank + 1) * cfg.intermediate_size // world)
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.self_attn
            for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
                proj.weight = nn.Parameter(proj.weight[rows].clone(), requires_grad=False)
                proj.out_features = proj.weight.shape[0]
            attn.o_proj = RowParallelLinear(attn.o_proj.weight[:, q_rows].clone(), group)
            mlp: SwiGLU = layer.mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight = nn.Parameter(proj.weight[mlp_rows].clone(), requires_grad=False)
                proj.out_features = proj.weight.shape[0]
            mlp.down_proj = RowParallelLinear(mlp.down_proj.weight[:, mlp_rows].clone(), group)
    return model


def local_kv_heads(model: Transformer) -> int:
    """The KV heads this rank's cache holds: all of them, or its slice under tensor parallelism."""
    return model.layers[0].self_attn.k_proj.weight.shape[0] // model.config.head_dim


# ---- processes -----------------------------------------------------------------------------------------------

def _device_for(device: str, rank: int) -> str:
    return f"cuda:{rank}" if torch.device(device).type == "cuda" else device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelGroup:
    """The ranks of one engine: the process group of the forward's all-reduces and a gloo group for control."""

    def __init__(self, rank: int, world: int, init_method: str, device: str):
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        self.rank, self.world = rank, world
        self.control = dist.new_group(backend="gloo")
        self.workers: list[Any] = []

    def send(self, message: Any) -> Any:
        """Rank 0: hand `message` to every worker; a worker: the next message from rank 0."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def agree_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def shutdown(self) -> None:
        if self.rank == 0 and dist.is_initialized():
            self.send(("stop", ()))
        for p in self.workers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(model_dir: Path, config: Any) -> TensorParallelGroup:
    """Rank 0 (this process): start the workers, each of which loads and shards the model and builds its engine
    beside ours, and join their process group."""
    import multiprocessing as mp

    world = config.tensor_parallel_size
    if torch.device(config.device).type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(f"engine.tensor_parallel_size: {world} ranks, but this host shows "
                          f"{torch.cuda.device_count()} CUDA devices")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(rank, world, init_method, str(model_dir), asdict(config)),
                         daemon=True, name=f"glassbox-tp-rank{rank}") for rank in range(1, world)]
    for p in procs:
        p.start()
    group = TensorParallelGroup(0, world, init_method, config.device)
    group.workers = procs
    return group


def _worker_main(rank: int, world: int, init_method: str, model_dir: str, config: dict) -> None:
    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.loader import load_model_dir

    torch.set_num_threads(max(1, int(os.environ.get("GLASSBOX_TP_THREADS", "1"))))
    cfg = EngineConfig(**config)
    group = TensorParallelGroup(rank, world, init_method, cfg.device)
    model, _, eos = load_model_dir(Path(model_dir), cfg.torch_dtype(), _device_for(cfg.device, rank))
    shard_model(model, rank, world)
    engine = LLMEngine(model, None, cfg, eos, tensor_parallel=group)
    runner, blocks = engine.runner, engine.blocks
    try:
        with torch.inference_mode():
            while True:
                method, args = group.send(None)
                if method == "stop":
                    break
                if method == "execute":
                    runner.execute(args[0], blocks)
                else:
                    getattr(runner, method)(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class LeaderRunner:
    """Rank 0's model runner: each call the engine makes goes to the workers first, then runs here."""

    def __init__(self, runner: Any, group: TensorParallelGroup):
        self._runner, self._group = runner, group

    def execute(self, batch, blocks) -> torch.Tensor:
        self._group.send(("execute", (batch,)))
        return self._runner.execute(batch, blocks)

    def move_kv(self, src: list[int], dst: list[int]) -> None:
        if src:
            self._group.send(("move_kv", (src, dst)))
        self._runner.move_kv(src, dst)

    def __getattr__(self, name: str) -> Any:        # read-only attributes (graphs, caches, sizes)
        return getattr(self._runner, name)
