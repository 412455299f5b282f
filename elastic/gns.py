"""The gradient noise scale, from gradient norms the training step already computes.

The estimators (McCandlish et al. 2018, "An empirical model of large-batch training", appendix A): a gradient
averaged over B samples has E|g_B|^2 = |G|^2 + tr(Sigma) / B, so two batch sizes B_small < B_big give unbiased
estimates of both terms,
    |G|^2     = (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big).
A step already has both: each rank's gradient accumulated over its first k micro-batches (k * m samples; the
trainer's `GradientStats.local_tensor_sq_norms`, taken before the reduction, one fused norm kernel per
micro-batch), and the all-reduced gradient of the whole global batch. Nothing hooks the backward per parameter
(AdaptDL's hooks made backward 2.6x slower, its issue #120); the overhead is one fused norm over the reduced
gradient and a three-number all-reduce per measured step (bench/pollux_gns.py measures it).

Adam preconditioning (what the noise scale means for an Adam step, as in Pollux): gradients are measured in the
geometry of the update, g / (sqrt(v_hat) + eps). Per-element preconditioning would need a pass over every
gradient for every micro-batch, and under FSDP2 the full second moment beside each unsharded local gradient; we
precondition per parameter tensor instead, weighting each tensor's squared norm by 1 / (sqrt(mean v_hat) + eps)^2,
the tensor's RMS second moment (exact when v_hat is uniform within a tensor; what it does capture is the orders
of magnitude between tensors, embeddings against norms against projections). The per-element mean of
1 / (sqrt(v_hat) + eps)^2 would be the other choice, and it is useless: embedding rows of tokens not yet seen
have v_hat ~ 0 and weigh 1 / eps^2. The weights are refreshed every `refresh_every` steps.

Both estimates are smoothed by an exponential moving average with bias correction (Adam's), its decay per
measurement `smoothing ** (B_big / M0)` so that the window counts samples, not steps. In AdaptDL's convention
(glassbox.elastic.goodput): grad_sqr = |G|^2, grad_var = tr(Sigma) / M0, noise scale phi = tr(Sigma) / |G|^2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from glassbox.errors import GlassboxError


def two_batch_estimates(b_small: float, sq_small: float, b_big: float, sq_big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from squared gradient norms at two batch sizes."""
    if not 0 < b_small < b_big:
        raise GlassboxError(f"gradient noise scale: need 0 < B_small < B_big, got {b_small} and {b_big}")
    grad_sqr = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sqr, trace


class NoiseScaleEMA:
    """Bias-corrected moving averages of |G|^2 and tr(Sigma); its state goes into checkpoints."""

    def __init__(self, init_batch: int, smoothing: float = 0.9):
        if not 0.0 <= smoothing < 1.0:
            raise GlassboxError(f"gradient noise scale: smoothing must be in [0, 1), got {smoothing}")
        self.init_batch = init_batch
        self.smoothing = smoothing
        self.sqr_avg = 0.0
        self.trace_avg = 0.0
        self.weight = 0.0       # the EMA's total weight: dividing by it is the bias correction
        self.count = 0

    def update(self, grad_sqr: float, trace: float, batch: int) -> None:
        if not (math.isfinite(grad_sqr) and math.isfinite(trace)):
            return  # a non-finite gradient (the loop stops the run for it) must not poison the averages
        beta = self.smoothing ** (batch / self.init_batch)
        self.sqr_avg = beta * self.sqr_avg + (1 - beta) * grad_sqr
        self.trace_avg = beta * self.trace_avg + (1 - beta) * trace
        self.weight = beta * self.weight + (1 - beta)
        self.count += 1

    @property
    def ready(self) -> bool:
        """An estimate exists and its signal is positive (early, noisy estimates can make |G|^2 negative)."""
        return self.count > 0 and self.sqr_avg > 0

    @property
    def grad_sqr(self) -> float:
        return self.sqr_avg / self.weight if self.weight else 0.0

    @property
    def trace(self) -> float:
        return max(self.trace_avg / self.weight, 0.0) if self.weight else 0.0

    @property
    def grad_var(self) -> float:
        """The variance at the initial batch, tr(Sigma) / M0 (AdaptDL's convention, glassbox.elastic.goodput)."""
        return self.trace / self.init_batch

    @property
    def noise_scale(self) -> float:
        return self.trace / self.grad_sqr if self.ready else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"sqr_avg": self.sqr_avg, "trace_avg": self.trace_avg, "weight": self.weight, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sqr_avg = float(state["sqr_avg"])
        self.trace_avg = float(state["trace_avg"])
        self.weight = float(state["weight"])
        self.count = int(state["count"])


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) and any(not pl.is_replicate() for pl in t.placements)


class GradientNoiseMeter:
    """Turns one step's `GradientStats` into device-side (small, big) norm pairs, Adam-preconditioned.

    `measure` queues the work (no host sync) and returns a tensor [B_small-weighted sums...]; `read` turns it
    into (B_small, |g_small|^2, B_big, |g_big|^2) after the step finished. Every data-parallel rank measures the
    same reduced gradient and averages the ranks' local norms, so all ranks hold the same estimate and make the
    same batch decisions.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp_group, dp_size: int,
                 refresh_every: int = 10):
        self.model = model
        self.optimizer = optimizer
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.refresh_every = refresh_every
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sharded = [_is_sharded(p) for p in self.params]
        self._weights: torch.Tensor | None = None
        self._weights_step = -1

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    @torch.no_grad()
    def preconditioner(self, step: int) -> torch.Tensor | None:
        """Per-parameter 1 / (sqrt(mean v_hat) + eps)^2; None before Adam's first step (no second moment)."""
        if self._weights is not None and step - self._weights_step < self.refresh_every:
            return self._weights
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        sums, counts, eps = [], [], []
        for p in self.params:
            state = self.optimizer.state.get(p)
            if not state or "exp_avg_sq" not in state:
                return None
            group = group_of[id(p)]
            t = float(state["step"])
            correction = 1.0 - group["betas"][1] ** t
            v = _local(state["exp_avg_sq"])
            sums.append(v.sum(dtype=torch.float32) / correction)
            counts.append(float(v.numel()))
            eps.append(group["eps"])
        sums_t = torch.stack(sums)
        counts_t = torch.tensor(counts, device=sums_t.device)
        sharded = torch.tensor(self.sharded, device=sums_t.device)
        if self.dp_size > 1 and bool(sharded.any()):
            # Shards sum over ranks; replicated tensors are the same on every rank and count once.
            both = torch.stack([torch.where(sharded, sums_t, 0.0), torch.where(sharded, counts_t, 0.0)])
            self._all_reduce(both)
            sums_t = torch.where(sharded, both[0], sums_t)
            counts_t = torch.where(sharded, both[1], counts_t)
        rms = (sums_t / counts_t).sqrt()
        self._weights = (rms + torch.tensor(eps, device=rms.device)).reciprocal().square()
        self._weights_step = step
        return self._weights

    @torch.no_grad()
    def measure(self, step: int, local_tensor_sq_norms: list[torch.Tensor], micro_batch: int,
                global_batch: int) -> torch.Tensor | None:
        """[|g_small,k|^2 for k = 1..n-1 (rank-averaged), |g_big|^2], preconditioned; None without a pair."""
        if not local_tensor_sq_norms:
            return None
        weights = self.preconditioner(step)
        if weights is None:
            return None
        n = len(local_tensor_sq_norms) + 1          # micro-batches this step on one rank
        grads = [_local(p.grad) for p in self.params]
        big = torch.stack(torch._foreach_norm(grads, 2.0)).float().pow(2)
        if self.dp_size > 1 and any(self.sharded):
            sharded = torch.tensor(self.sharded, device=big.device)
            reduced = self._all_reduce(torch.where(sharded, big, 0.0))
            big = torch.where(sharded, reduced, big)
        # Accumulated with weight 1/n per micro-batch: after k of them the local gradient is k/n of their mean.
        small = torch.stack([(weights * v).sum() * (n / k) ** 2
                             for k, v in enumerate(local_tensor_sq_norms, start=1)])
        small = self._all_reduce(small) / self.dp_size
        return torch.cat([small, (weights * big).sum().reshape(1)])

    @staticmethod
    def pairs(values: list[float], micro_batch: int, global_batch: int) -> list[tuple[int, float, int, float]]:
        """(B_small, |g_small|^2, B_big, |g_big|^2) for each local prefix of the step's micro-batches."""
        *small, big = values
        return [(k * micro_batch, s, global_batch, big) for k, s in enumerate(small, start=1)]


def estimate_from_pairs(pairs: list[tuple[int, float, int, float]]) -> tuple[float, float]:
    """The mean of the two-batch estimates over a step's (small, big) pairs."""
    estimates = [two_batch_estimates(*p) for p in pairs]
    return (sum(e[0] for e in estimates) / len(estimates), sum(e[1] for e in estimates) / len(estimates))
