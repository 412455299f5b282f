"""ListMLE, the ranker's loss, and Kendall's tau, its quality measure.

ListMLE (Xia et al., 2008) is the negative log-likelihood of the true order under the Plackett-Luce model the
scores define: the first item is drawn with probability softmax(scores), the next from the rest, and so on. The
true order here is shortest output first, by length bucket (bucket width 10 tokens, as vllm-ltr labels); items in
one bucket keep their order in the list, which the trainer shuffles every epoch, so ties are broken at random.
"""

from __future__ import annotations

import torch

BUCKET_WIDTH = 10


def buckets(lengths: torch.Tensor, width: int = BUCKET_WIDTH) -> torch.Tensor:
    """Output lengths -> length buckets (0 for 0..width-1, ...)."""
    return torch.div(lengths, width, rounding_mode="floor")


def listmle_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log P(true order | scores) for one list: `scores` [n] (higher ranks first), `labels` [n] (lower ranks
    first; ties in list order)."""
    order = torch.sort(labels, stable=True).indices
    s = scores[order]
    # Position i's normaliser sums over the items not yet drawn: i..n-1, a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(s.flip(0), dim=0).flip(0)
    return (tail - s).sum()


def kendall_tau(predicted: list[float], true: list[float]) -> float:
    """Kendall's tau-b between two orderings of the same items: 1 for the same order, -1 for the reverse, about 0
    for an unrelated one; pairs tied in either are counted as tau-b counts them (NaN if one side is all ties).
    Over all pairs at once (fine for the few thousand held-out prompts here), in numpy: the GPU image has no
    scipy."""
    import numpy as np

    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denom = np.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    return float((dx * dy).sum() / denom) if denom else float("nan")
