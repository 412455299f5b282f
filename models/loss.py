"""The next-token loss, one definition for training, held-out evaluation, the release's per-checkpoint losses and
the pruning search's candidates: the same fp32 cross-entropy everywhere, so their numbers compare."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in fp32 of logits [B, T, vocab] against next-token targets [B, T]: "mean", "sum", or "none"
    (one value per position, flattened to [B x T])."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def window_next_token_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Each window's mean next-token loss (nats), [n] float64 on the CPU, for `windows` ([n, seq_len + 1] token
    ids); the windows move to the model's device a batch at a time. Per window, so that two models scored on the
    same windows can be compared pair by pair (a difference and its standard error), not only in the mean."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        loss = next_token_loss(model(batch[:, :-1]), batch[:, 1:], reduction="none").view(batch.shape[0], -1)
        out.append(loss.double().mean(1).cpu())
    return torch.cat(out)


def mean_next_token_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats) of `model` over `windows` ([n, seq_len + 1] token ids), every token weighted
    equally (the windows are of one length)."""
    return float(window_next_token_losses(model, windows, batch_size).mean())
