"""Distances between the experts of one MoE layer, on one scale for every layer (one global threshold cuts all).

Co-selection (behavioural, the paper's): experts the router picks for the same tokens compute interchangeable
things for them. d(i, j) = 1 - C_ij / sqrt(C_ii C_jj), the cosine distance between the experts' token-selection
indicator vectors, in [0, 1]; an expert never selected is at distance 1 from all.

Output-weighted co-selection (the default): the cosine distance times the smaller of the pair's per-token output
contributions (routing weight x output norm, averaged over the calibration tokens). The cosine alone is
scale-free, so one threshold treats a layer whose experts each write a large share of the residual update like
one whose experts barely write anything. On the trained MoEs here that is what made expert pruning expensive: the
first layer's experts are token specialists (one alone costs up to +0.66 nats on stun-moe-tiny, while most
deeper experts cost under 0.001), yet their co-selection distances were among the smallest, so every STUN run
dropped one of them first. Weighted by output, a distance is the output norm per token at stake when the pair is
merged (the smaller member is the one a merge reroutes), in the residual stream's units in every layer: rarely
used or silent experts (a never-selected one is at distance 0 from all) go first, load-bearing layers last.
The greedy complete-linkage clustering, the global threshold and the one forward pass are unchanged.

Router weights (no forward pass): two experts whose router rows are close receive the same tokens with the same
scores. d(i, j) = ||w_i - w_j|| divided by the layer's mean off-diagonal distance, so layers whose routers differ
in scale share one threshold.
"""

from __future__ import annotations

import torch


def coselection_distance(coselect: torch.Tensor) -> torch.Tensor:
    """[E, E] co-selection counts -> [E, E] distances in [0, 1], zero diagonal."""
    counts = coselect.double()
    n = counts.diagonal()
    denom = torch.sqrt(n[:, None] * n[None, :])
    sim = torch.where(denom > 0, counts / denom.clamp_min(1e-300), torch.zeros_like(counts))
    dist = (1.0 - sim).clamp(0.0, 1.0)
    dist.fill_diagonal_(0.0)
    return dist


def output_weighted_distance(coselect: torch.Tensor, contribution: torch.Tensor, tokens: int) -> torch.Tensor:
    """[E, E] co-selection counts and [E] summed contributions over `tokens` calibration tokens -> [E, E]
    co-selection distances times min(per-token contribution of i, of j), zero diagonal."""
    per_token = contribution.double() / max(tokens, 1)
    return coselection_distance(coselect) * torch.minimum(per_token[:, None], per_token[None, :])


def router_distance(router_weight: torch.Tensor) -> torch.Tensor:
    """[E, hidden] router rows -> [E, E] Euclidean distances over the layer's mean off-diagonal distance."""
    w = router_weight.double()
    dist = torch.cdist(w, w)
    E = w.shape[0]
    mean = dist.sum() / max(E * (E - 1), 1)
    dist = dist / mean if mean > 0 else dist
    dist.fill_diagonal_(0.0)
    return dist
