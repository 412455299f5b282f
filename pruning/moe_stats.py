"""One calibration pass over an MoE: per layer, top-k co-selection counts and the input norms Wanda needs.

Forward pre-hooks on each MoE layer see exactly the hidden states the layer routes, so the statistics come from
the model's own forward, not a re-implementation of it. Co-selection: C[i, j] = tokens whose top-k holds both i
and j (C[i, i]: tokens routed to i).

Wanda's input norms: per expert, over its routed tokens, the sum of w^2 x (input)^2, where w is the token's routing
weight for that expert, the input of gate/up is the hidden state h and that of down is act = silu(gate h) * up h.
The layer adds w x expert(h) to the residual stream, so what a weight of the expert is worth to the output scales
with w: for down, w x down(act) = down(w x act) exactly, so its input is w x act; for up (and gate, to first
order) zeroing W_ij moves the output by w x (...) x h_j. Wanda's ||X_j|| is therefore the norm of w x h_j (of
w x act_j) over the tokens. Unweighted, a token the expert barely serves (w near 0) would count as much as one it
serves alone, and weights that only matter to such tokens would be kept at the expense of ones that matter.
Contribution: per expert, the sum over its tokens of routing weight x the norm of its output, what the layer's
output would lose without it: it weights the co-selection distance (glassbox.pruning.expert_similarity) and breaks
stage 1's ties between experts its distances cannot tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glassbox.models.transformer import MoE, Transformer


@dataclass
class LayerStats:
    coselect: torch.Tensor              # [E, E] float64 co-selection counts
    contribution: torch.Tensor          # [E] float64 sum of routing weight x output norm
    input_sq: torch.Tensor | None       # [E, hidden] sum of w^2 x squared gate/up inputs per expert
    hidden_sq: torch.Tensor | None      # [E, intermediate] sum of w^2 x squared down inputs per expert
    tokens: int = 0                     # calibration tokens the layer routed


def _moe_layers(model: Transformer) -> list[MoE]:
    return [layer.mlp for layer in model.layers]


@torch.no_grad()
def collect_stats(model: Transformer, windows: torch.Tensor, batch_size: int = 8,
                  activations: bool = True) -> list[LayerStats]:
    """Run `windows` ([N, T] token ids) through `model` once; per-layer statistics in layer order."""
    device = next(model.parameters()).device
    stats = []
    for moe in _moe_layers(model):
        E, f, d = moe.gate_proj.shape
        stats.append(LayerStats(
            coselect=torch.zeros(E, E, dtype=torch.float64, device=device),
            contribution=torch.zeros(E, dtype=torch.float64, device=device),
            input_sq=torch.zeros(E, d, dtype=torch.float64, device=device) if activations else None,
            hidden_sq=torch.zeros(E, f, dtype=torch.float64, device=device) if activations else None,
        ))

    def hook_for(i: int, moe: MoE):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, weights, experts = moe.route(x)
            chosen = torch.zeros(x.shape[0], moe.num_experts, dtype=torch.float64, device=x.device)
            chosen.scatter_(1, experts, 1.0)
            stats[i].coselect += chosen.T @ chosen
            stats[i].tokens += x.shape[0]
            for e in range(moe.num_experts):
                hit = experts == e
                idx = hit.any(dim=-1).nonzero().squeeze(-1)
                if idx.numel() == 0:
                    continue
                h = x[idx].float()
                act = F.silu(h @ moe.gate_proj[e].float().T) * (h @ moe.up_proj[e].float().T)
                out = act @ moe.down_proj[e].float().T
                w = (weights * hit).sum(dim=-1)[idx].double()
                stats[i].contribution[e] += (w * out.double().norm(dim=-1)).sum()
                if activations:
                    w2 = w.pow(2)[:, None]
                    stats[i].input_sq[e] += (w2 * h.double().pow(2)).sum(0)
                    stats[i].hidden_sq[e] += (w2 * act.double().pow(2)).sum(0)
        return hook

    handles = [moe.register_forward_pre_hook(hook_for(i, moe)) for i, moe in enumerate(_moe_layers(model))]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
