"""Wanda unstructured pruning inside the experts: score |W_ij| x ||X_j||, drop the lowest scores of each row.

Wanda (Sun et al., 2023) compares weights within one output row, weighting each by the norm of the input feature
it multiplies over the calibration tokens, so a small weight on a loud feature survives a large one on a silent
feature. Each expert is scored on the tokens routed to it (glassbox.pruning.moe_stats). OWL (Yin et al., 2023),
optionally, gives layers with more outlier scores (> M x the layer's mean score) a lower sparsity, spreading the
ratios over [s - lambda, s + lambda] with the same mean. A ratio must stay in [0, MAX_SPARSITY]; clamping alone
would move the mean (at a small s, the layers pushed below 0 lose their share of the pruning and the model ends
up denser than asked), so the spread ratios are shifted by one common offset, found by bisection, until the
clamped ratios have the mean again. The shift keeps the layers' order, and the mean is exact whenever s itself
is in range.
"""

from __future__ import annotations

import torch

from glassbox.errors import GlassboxError
from glassbox.models.transformer import Transformer
from glassbox.pruning.moe_stats import LayerStats

MAX_SPARSITY = 0.99                     # an OWL ratio's ceiling: every row keeps some weights


def row_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask for `weight` [out, in]: each row loses exactly round(sparsity * in) weights, the ones
    with the lowest |W| x input_norm (ties: the lower column index goes first)."""
    if not 0.0 <= sparsity < 1.0:
        raise GlassboxError(f"sparsity {sparsity} must be in [0, 1)")
    cols = weight.shape[-1]
    drop = int(round(sparsity * cols))
    mask = torch.ones_like(weight, dtype=torch.bool)
    if drop == 0:
        return mask
    score = weight.abs().double() * input_norm.double()[None, :]
    order = torch.argsort(score, dim=-1, stable=True)
    mask.scatter_(-1, order[:, :drop], False)
    return mask


def _expert_matrices(model: Transformer, stats: list[LayerStats]):
    """(layer, expert, stacked parameter, input norm) for every expert matrix."""
    for i, (layer, st) in enumerate(zip(model.layers, stats)):
        moe = layer.mlp
        in_norm, hid_norm = st.input_sq.sqrt(), st.hidden_sq.sqrt()
        for e in range(moe.num_experts):
            yield i, e, moe.gate_proj, in_norm[e]
            yield i, e, moe.up_proj, in_norm[e]
            yield i, e, moe.down_proj, hid_norm[e]


@torch.no_grad()
def owl_ratios(model: Transformer, stats: list[LayerStats], sparsity: float, lam: float = 0.08,
               outlier_m: float = 5.0) -> list[float]:
    """Per-layer sparsities averaging `sparsity` over all expert weights (layers weighted by their size, which
    differs after expert pruning): layers with more outlier scores are pruned less."""
    outliers = [0] * len(model.layers)
    sizes = [0] * len(model.layers)
    for i in range(len(model.layers)):
        scores = [(param[e].abs().double() * norm.double()[None, :]).flatten()
                  for layer, e, param, norm in _expert_matrices(model, stats) if layer == i]
        score = torch.cat(scores)
        outliers[i] = int((score > outlier_m * score.mean()).sum())
        sizes[i] = score.numel()
    return owl_spread([o / n for o, n in zip(outliers, sizes)], sizes, sparsity, lam)


def owl_spread(outlier_ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """OWL's per-layer sparsities from each layer's outlier ratio: linear in it over a 2 x `lam` range (more
    outliers, lower sparsity), each in [0, MAX_SPARSITY], with size-weighted mean `sparsity`."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    if float(d.max() - d.min()) == 0.0:
        return [sparsity] * len(outlier_ratios)
    spread = (d - d.min()) / (d.max() - d.min()) * 2 * lam
    weight = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    return mean_preserving_clamp(sparsity - spread, weight, sparsity).tolist()


def mean_preserving_clamp(values: torch.Tensor, weight: torch.Tensor, mean: float,
                          iterations: int = 100) -> torch.Tensor:
    """clamp(values + c, 0, MAX_SPARSITY) with the offset c that makes its `weight`-weighted mean `mean`.

    The clamped mean is continuous and non-decreasing in c, so bisection over c finds it; c spans
    [-1 - max, 1 - min], where every value is clamped to 0 at one end and to MAX_SPARSITY at the other."""
    def clamped(c: float) -> torch.Tensor:
        return (values + c).clamp(0.0, MAX_SPARSITY)

    lo, hi = -1.0 - float(values.max()), 1.0 - float(values.min())
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float((clamped(mid) * weight).sum()) < mean:
            lo = mid
        else:
            hi = mid
    return clamped((lo + hi) / 2)


@torch.no_grad()
def wanda_prune_experts(model: Transformer, stats: list[LayerStats], sparsity: float | list[float]) -> int:
    """Zero the lowest-scoring weights of every expert matrix in place (per layer sparsity if a list);
    returns how many weights were zeroed."""
    per_layer = sparsity if isinstance(sparsity, list) else [sparsity] * len(model.layers)
    zeroed = 0
    for i, e, param, norm in _expert_matrices(model, stats):
        w = param[e]
        mask = row_mask(w, norm.to(w.device), per_layer[i])
        zeroed += int((~mask).sum())
        w.mul_(mask.to(w.dtype))
    return zeroed
