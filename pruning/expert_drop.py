"""Build the smaller MoE that keeps, per layer, a chosen subset of experts (per-layer counts in its config).

Router rows: the kept experts' rows are kept (`router="keep"`), so a token whose top-k named a dropped expert
falls to its next choice among the survivors, renormalised as usual; or each representative's row becomes the
mean of its cluster's rows (`router="mean"`), which pulls the cluster's tokens towards it. Top-k is unchanged;
every layer keeps at least its top-k experts (the clustering's floor guarantees it).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from glassbox.errors import GlassboxError
from glassbox.models.transformer import Transformer

RouterMode = Literal["keep", "mean"]


def drop_experts(model: Transformer, kept: list[list[int]], clusters: list[list[list[int]]] | None = None,
                 router: RouterMode = "keep") -> Transformer:
    """A new Transformer with layer i's experts `kept[i]` (in that order); `clusters[i]` aligns with `kept[i]`
    (the members each kept expert stands for) and is needed only by `router="mean"`."""
    cfg = copy.deepcopy(model.config)
    if len(kept) != cfg.num_layers:
        raise GlassboxError(f"drop_experts: {len(kept)} expert lists for {cfg.num_layers} layers")
    if router == "mean" and clusters is None:
        raise GlassboxError("drop_experts: router='mean' needs the clusters")
    counts = [len(k) for k in kept]
    for i, n in enumerate(counts):
        if n < cfg.top_k_in_layer(i):
            raise GlassboxError(f"layer {i}: keeping {n} experts, fewer than its top-k ({cfg.top_k_in_layer(i)})")
    cfg.layer_num_experts = counts
    cfg.layer_experts_per_token = [cfg.top_k_in_layer(i) for i in range(cfg.num_layers)]
    cfg.num_experts = max(counts)
    sd = {k: v for k, v in model.state_dict().items()}
    for i, ids in enumerate(kept):
        index = torch.tensor(ids, dtype=torch.long, device=sd[f"layers.{i}.mlp.gate_proj"].device)
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"layers.{i}.mlp.{name}"
            sd[key] = sd[key].index_select(0, index).clone()
        key = f"layers.{i}.mlp.router.weight"
        rows = sd[key]
        if router == "mean":
            sd[key] = torch.stack([rows[members].mean(dim=0) for members in clusters[i]])
        else:
            sd[key] = rows.index_select(0, index).clone()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = Transformer(cfg)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    pruned.load_state_dict(sd, strict=True, assign=True)
    return pruned.materialize(device).to(dtype).eval()
