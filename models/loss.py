"""The next-token loss, one definition for training, held-out evaluation, the release's per-checkpoint losses and
the pruning search's candidates: the same fp32 cross-entropy everywhere, so their numbers compare."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (mean, or "sum"), in fp32, of logits [B, T, vocab] against next-token targets [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def mean_next_token_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats) of `model` over `windows` ([n, seq_len + 1] token ids), every token weighted
    equally; the windows move to the model's device a batch at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        total += next_token_loss(model(batch[:, :-1]), batch[:, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count
