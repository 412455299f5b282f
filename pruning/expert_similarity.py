"""Distances between the experts of one MoE layer, on one scale for every layer (one global threshold cuts all).

Co-selection (behavioural): experts the router picks for the same tokens compute interchangeable things for
them. d(i, j) = 1 - C_ij / sqrt(C_ii C_jj), the cosine distance between the experts' token-selection indicator
vectors, in [0, 1]; an expert never selected is at distance 1 from all.
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


def router_distance(router_weight: torch.Tensor) -> torch.Tensor:
    """[E, hidden] router rows -> [E, E] Euclidean distances over the layer's mean off-diagonal distance."""
    w = router_weight.double()
    dist = torch.cdist(w, w)
    E = w.shape[0]
    mean = dist.sum() / max(E * (E - 1), 1)
    dist = dist / mean if mean > 0 else dist
    dist.fill_diagonal_(0.0)
    return dist
