"""Build the model to train without ever holding it whole: on the meta device, parallelized, then initialised.

`Transformer(cfg)` on the host would allocate every weight at full size on every rank before FSDP2 or tensor
parallel shard it (~27 GB per rank for a 7B model). `build_model` builds it under `torch.device("meta")` (shapes,
no storage), applies `parallelize` (TP, activation checkpointing, compile and FSDP2 all work on meta modules),
gives each rank storage for its own shards only, and fills them.

The weights are bit-identical to the eager build's for the same seed (`seed_everything(seed)`, then
`Transformer(cfg)`), and the global RNG is left where the eager build leaves it, because the draws are replayed
in the eager build's order from the same CPU generator: first what torch's layers draw in their constructors
(the eager build makes them, then `reset_parameters` overwrites their init), then each parameter's full value as
`Transformer.init_parameter` draws it, one tensor at a time, of which each rank keeps only its shard. The host
holds one full tensor at a time beyond the rank's shards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from glassbox.models.transformer import ModelConfig, Transformer
from glassbox.train.config import ParallelConfig
from glassbox.train.parallel import World, parallelize


def build_model(cfg: ModelConfig, parallel: ParallelConfig, world: World, bf16: bool,
                make: Callable[[ModelConfig], Transformer] = Transformer) -> nn.Module:
    """The module to train (as `parallelize` returns it), built on the meta device and initialised in place.
    `make` builds the model from its config (a Transformer subclass for a transformed model, such as SwiftKV's)."""
    with torch.device("meta"):
        model = make(cfg)
    replay_constructor_draws(model)
    # DDP broadcasts rank 0's weights when it wraps the model, so they must exist first (each rank holds all of
    # them under DDP anyway); FSDP2 and tensor parallel shard meta weights, and only the shards are filled.
    ddp = world.dp_size > 1 and parallel.data_parallel == "ddp"
    if ddp:
        init_weights(model, world.device)
    module = parallelize(model, parallel, world, bf16)
    if not ddp:
        init_weights(model, world.device)
    return module


def replay_constructor_draws(model: nn.Module) -> None:
    """Draw what torch's layers (nn.Linear, nn.Embedding) draw for their default init when the eager build
    constructs them, in construction order (the module order), each on a scratch CPU copy of that one layer."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            copy.deepcopy(module).to_empty(device="cpu").reset_parameters()


@torch.no_grad()
def init_weights(model: Transformer, device: torch.device) -> None:
    """Give a meta-built (and possibly sharded) model storage on `device` and its initial weights.

    Each parameter's full value is drawn on the CPU, as the eager build draws it: straight into a whole CPU
    parameter, else into a scratch tensor of which a DTensor keeps the slice its placements give this rank
    (`distribute_tensor` with `src_data_rank=None` slices locally, no communication).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.materialize(device)
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor) and p.device.type == "cpu":
            model.init_parameter(name, p)
            continue
        full = torch.empty(p.shape, dtype=p.dtype, device="cpu")
        model.init_parameter(name, full)
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(full)
