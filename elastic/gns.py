"""The gradient noise scale, from gradient norms the training step already computes.

The estimators (McCandlish et al. 2018, "An empirical model of large-batch training", appendix A): a gradient
averaged over B samples has E|g_B|^2 = |G|^2 + tr(Sigma) / B, so two batch sizes B_small < B_big give unbiased
estimates of both terms,
    |G|^2     = (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big).
A step of several micro-batches per rank already has both: each rank's gradient accumulated over its first k
micro-batches (k * m samples; the trainer's `GradientStats.local_tensor_sq_norms`, taken before the reduction, one
fused norm kernel per micro-batch), and the all-reduced gradient of the whole global batch. The Pollux agent makes
such steps out of steps of one micro-batch per rank by splitting one in two every few steps, as often as its split
budget pays for (glassbox.elastic.agent): a measurement at one point of the weights. Between them (and without
splits) steps of one micro-batch per rank are taken three at a time, consecutive and of one batch size B: the
noise of independent batches makes the second difference D = g_1 - 2 g_2 + g_3 have E|D|^2 = 6 tr(Sigma) / B,
while the weights' motion between the steps cancels to first order (a difference of two consecutive steps would
carry B |G_2 - G_1|^2 / 2 into tr(Sigma): on the H200 that read the noise scale 2.2x high, and Pollux grew the
batch 4x too far). It costs one kept buffer of the gradient's size and no extra forward/backward, but the drift's
change between steps does not cancel: along real H200 runs the triples read phi 1.5-10x the direct estimate while
the loss fell fast.
Nothing hooks the backward per parameter (AdaptDL's hooks made backward 2.6x slower, its issue #120), and nothing
waits for the device: the overhead is a few fused norm kernels per step and, with several ranks, a small
all-reduce (bench/pollux_gns.py measures it).

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
from dataclasses import dataclass
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
        self.sqr_sq_avg = 0.0   # of the |G|^2 estimates squared: their spread, for `grad_sqr_rel_error`
        self.weight = 0.0       # the EMA's total weight: dividing by it is the bias correction
        self.weight_sq = 0.0    # the sum of the squared weights: 1 / the effective number of estimates averaged
        self.count = 0

    def update(self, grad_sqr: float, trace: float, batch: int) -> None:
        if not (math.isfinite(grad_sqr) and math.isfinite(trace)):
            return  # a non-finite gradient (the loop stops the run for it) must not poison the averages
        beta = self.smoothing ** (batch / self.init_batch)
        self.sqr_avg = beta * self.sqr_avg + (1 - beta) * grad_sqr
        self.trace_avg = beta * self.trace_avg + (1 - beta) * trace
        self.sqr_sq_avg = beta * self.sqr_sq_avg + (1 - beta) * grad_sqr * grad_sqr
        self.weight = beta * self.weight + (1 - beta)
        self.weight_sq = beta * beta * self.weight_sq + (1 - beta) ** 2
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
    def grad_sqr_rel_error(self) -> float:
        """The standard error of the averaged |G|^2 over its value, from the estimates' own spread: |G|^2 is a
        small difference of two large norms when phi is many times the batch, and a phi read from it is only as
        good as this (inf with fewer than two estimates)."""
        if self.count < 2 or not self.weight:
            return math.inf
        mean = self.sqr_avg / self.weight
        spread = max(self.sqr_sq_avg / self.weight - mean * mean, 0.0)
        return math.sqrt(spread * self.weight_sq) / self.weight / abs(mean) if mean else math.inf

    @property
    def grad_var(self) -> float:
        """The variance at the initial batch, tr(Sigma) / M0 (AdaptDL's convention, glassbox.elastic.goodput)."""
        return self.trace / self.init_batch

    @property
    def noise_scale(self) -> float:
        return self.trace / self.grad_sqr if self.ready else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"sqr_avg": self.sqr_avg, "trace_avg": self.trace_avg, "weight": self.weight, "count": self.count,
                "sqr_sq_avg": self.sqr_sq_avg, "weight_sq": self.weight_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sqr_avg = float(state["sqr_avg"])
        self.trace_avg = float(state["trace_avg"])
        self.weight = float(state["weight"])
        self.count = int(state["count"])
        self.sqr_sq_avg = float(state.get("sqr_sq_avg", 0.0))
        self.weight_sq = float(state.get("weight_sq", 0.0))


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) and any(not pl.is_replicate() for pl in t.placements)


@dataclass
class Measurement:
    """One step's preconditioned squared gradient norms, still on the device, and the batch sizes they belong to:
    `values` = [|g_small,1|^2, ..., |g_small,k|^2, |g_big|^2], the i-th small one at `small_batches[i]` samples,
    the big one at `big_batch`; `samples`, the samples the measurement spans (the moving average's window counts
    them: a triple of steps spans three batches). The agent copies `values` to the host without waiting (it is
    read once the step has finished, when the trainer has read the step's own metrics anyway)."""

    values: torch.Tensor
    small_batches: list[int]
    big_batch: int
    samples: int
    kind: str = "split"     # "split": micro-batches of one step, one point of the weights; "triple": three steps

    def pairs(self, host_values: list[float]) -> list[tuple[int, float, int, float]]:
        """(B_small, |g_small|^2, B_big, |g_big|^2) for each small batch of the step."""
        *small, big = host_values
        return [(b, s, self.big_batch, big) for b, s in zip(self.small_batches, small)]


class GradientNoiseMeter:
    """Turns one step's `GradientStats` into device-side (small, big) norm pairs, Adam-preconditioned.

    Two sources of a second batch size, neither an extra forward/backward:
    - a step of several micro-batches per rank: each rank's gradient after its first k micro-batches (k * m
      samples) against the reduced gradient of the global batch B;
    - steps of one micro-batch per rank (`consecutive_steps`): the reduced gradients of three consecutive steps of
      one batch B (1-2-3, 4-5-6, ..., not overlapping, so each triple is an independent estimate), whose mean
      squared norm is |G|^2 + tr(Sigma) / B and whose second difference D = g_1 - 2 g_2 + g_3 has
      E|D|^2 = 6 tr(Sigma) / B plus only the change of the weights' drift (the drift itself cancels). As a
      Measurement: |g_B|^2 = that mean at B, and |G|^2 + tr(Sigma) / 2B = mean - |D|^2 / 12 at 2B. One buffer
      (the local shard under FSDP2) accumulates D in place: a pass over the gradient's memory to copy, then one
      per later step, which a GPU does in well under a millisecond for 100M parameters.
    Splitting a single micro-batch in two instead (the agent's default) needs no copy and measures at one point
    of the weights, but costs a second pass per measured step, ~1.5 steps on a GPU for a small model whose pass
    is mostly fixed cost: the agent rations the split steps.

    Nothing here reads a device value on the host: `measure` only queues kernels (and, with several ranks, a
    small all-reduce). Every data-parallel rank measures the same reduced gradient and averages the ranks' local
    norms, so all ranks hold the same estimate and make the same batch decisions.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp_group, dp_size: int,
                 refresh_every: int = 10, consecutive_steps: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.refresh_every = refresh_every
        self.consecutive_steps = consecutive_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sharded = [_is_sharded(p) for p in self.params]
        self._weights: torch.Tensor | None = None
        self._weights_step = -1
        self._constants: dict[str, torch.Tensor] = {}
        # The triple of single-micro-batch steps being measured: D accumulated so far (g_1, then g_1 - 2 g_2), the
        # sum of its steps' per-tensor squared norms, and (first step, batch, steps so far).
        self._diff: list[torch.Tensor] | None = None
        self._norm_sum: torch.Tensor | None = None
        self._run: tuple[int, int, int] | None = None
        # A triple opens on any step (0) or only on steps that are multiples of this: the agent spaces them out
        # once it has made its first decision (`space_triples`).
        self.triple_every = 0

    def space_triples(self, every: int) -> None:
        """Open a triple only on steps that are multiples of `every`. The agent does so from its first decision
        on when the triples are the split steps' fallback (one fresh triple per decision): back to back, the kept
        gradient's copy and norms cost a host-bound loop a few percent of every step (the H200, compiled), for
        an estimate the decisions stop using once the splits are precise."""
        self.triple_every = every

    def stop_consecutive_steps(self) -> None:
        """Measure no more triples (and free the kept gradient buffer)."""
        self.consecutive_steps = False
        self._diff = self._norm_sum = self._run = None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def _constant(self, name: str, values: list, device: torch.device) -> torch.Tensor:
        """A per-parameter constant on the device, copied there once and without waiting: a blocking host-to-device
        copy (torch.tensor(list, device=...)) waits for the device's queue, a sync every time it is built."""
        if name not in self._constants:
            self._constants[name] = torch.tensor(values).to(device, non_blocking=True)
        return self._constants[name]

    def _full_sq_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-parameter squared norms of full tensors from their local parts (sharded ones summed over ranks)."""
        sq = torch.stack(torch._foreach_norm(tensors, 2.0)).float().pow(2)
        if self.dp_size > 1 and any(self.sharded):
            sharded = self._constant("sharded", self.sharded, sq.device)
            reduced = self._all_reduce(torch.where(sharded, sq, 0.0))
            sq = torch.where(sharded, reduced, sq)
        return sq

    @torch.no_grad()
    def preconditioner(self, step: int) -> torch.Tensor | None:
        """Per-parameter 1 / (sqrt(mean v_hat) + eps)^2; None before Adam's first step (no second moment).
        All on the device: Adam's step counts stay tensors (on the device under fused AdamW)."""
        if self._weights is not None and step - self._weights_step < self.refresh_every:
            return self._weights
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        moments, steps = [], []
        for p in self.params:
            state = self.optimizer.state.get(p)
            if not state or "exp_avg_sq" not in state:
                return None
            moments.append(_local(state["exp_avg_sq"]))
            steps.append(torch.as_tensor(state["step"]).reshape(()))
        # exp_avg_sq >= 0, so its L1 norm is its sum: one fused kernel over every tensor.
        sums_t = torch.stack(torch._foreach_norm(moments, 1.0)).float()
        device = sums_t.device
        groups = [group_of[id(p)] for p in self.params]
        beta2 = self._constant("beta2", [float(g["betas"][1]) for g in groups], device)
        eps = self._constant("eps", [float(g["eps"]) for g in groups], device)
        counts_t = self._constant("counts", [float(v.numel()) for v in moments], device)
        sums_t = sums_t / (1.0 - beta2.pow(torch.stack(steps).to(device, torch.float32, non_blocking=True)))
        if self.dp_size > 1 and any(self.sharded):
            # Shards sum over ranks; replicated tensors are the same on every rank and count once.
            sharded = self._constant("sharded", self.sharded, device)
            both = torch.stack([torch.where(sharded, sums_t, 0.0), torch.where(sharded, counts_t, 0.0)])
            self._all_reduce(both)
            sums_t = torch.where(sharded, both[0], sums_t)
            counts_t = torch.where(sharded, both[1], counts_t)
        rms = (sums_t / counts_t).sqrt()
        self._weights = (rms + eps).reciprocal().square()
        self._weights_step = step
        return self._weights

    @torch.no_grad()
    def measure(self, step: int, local_tensor_sq_norms: list[torch.Tensor], micro_batch: int,
                global_batch: int) -> Measurement | None:
        """The step's pairs, preconditioned; None without a pair (or before Adam's first step)."""
        if not local_tensor_sq_norms and not self.consecutive_steps:
            return None                 # a whole step, no triples: nothing to read (most steps, once splits rule)
        run = self._run
        continues = run is not None and run[0] + run[2] == step and run[1] == global_batch
        if not local_tensor_sq_norms and not continues and self.triple_every > 1 and step % self.triple_every:
            self._run = None
            return None                 # triples are spaced out and none opens here
        grads = [_local(p.grad) for p in self.params]
        if local_tensor_sq_norms:
            self._run = None            # a step of several micro-batches: no consecutive triple across it
            weights = self.preconditioner(step)
            if weights is None:
                return None
            n = len(local_tensor_sq_norms) + 1          # micro-batches this step on one rank
            big = self._full_sq_norms(grads)
            # Accumulated with weight 1/n per micro-batch: after k of them the local gradient is k/n of their mean.
            small = torch.stack([(weights * v).sum() * (n / k) ** 2
                                 for k, v in enumerate(local_tensor_sq_norms, start=1)])
            small = self._all_reduce(small) / self.dp_size
            return Measurement(torch.cat([small, (weights * big).sum().reshape(1)]),
                               [k * micro_batch for k in range(1, n)], global_batch, global_batch)
        norms = self._full_sq_norms(grads)
        if continues:
            if run[2] == 1:                                   # the second step: D = g_1 - 2 g_2
                torch._foreach_add_(self._diff, grads, alpha=-2.0)
                self._norm_sum = self._norm_sum + norms
                self._run = (run[0], run[1], 2)
                return None
            weights = self.preconditioner(step)
            if weights is not None:                           # the third: D = g_1 - 2 g_2 + g_3
                torch._foreach_add_(self._diff, grads)
                second = (weights * self._full_sq_norms(self._diff)).sum()
                mean = (weights * (self._norm_sum + norms)).sum() / 3
                self._run = None      # triples do not overlap: the next step starts the next one
                return Measurement(torch.stack([mean, mean - second / 12]), [global_batch], 2 * global_batch,
                                   3 * global_batch, kind="triple")
        # This step opens a triple: its gradient is kept (the optimizer and zero_grad are about to consume it).
        if self._diff is None:
            self._diff = [g.detach().clone() for g in grads]
        else:
            torch._foreach_copy_(self._diff, grads)
        self._norm_sum, self._run = norms, (step, global_batch, 1)
        return None


def estimate_from_pairs(pairs: list[tuple[int, float, int, float]]) -> tuple[float, float]:
    """The mean of the two-batch estimates over a step's (small, big) pairs (Measurement.pairs)."""
    estimates = [two_batch_estimates(*p) for p in pairs]
    return (sum(e[0] for e in estimates) / len(estimates), sum(e[1] for e in estimates) / len(estimates))
