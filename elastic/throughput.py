"""Pollux's throughput model: how long one optimizer step takes for an allocation and a batch shape.

API (stable; the cluster scheduler in glassbox.elastic.sched imports it):
  ThroughputParams(alpha_c, beta_c, alpha_r, beta_r, alpha_n, beta_n, gamma)   the fitted parameters (seconds)
  StepObservation(num_nodes, num_replicas, micro_batch, accum_steps, step_time)  one measured step
  fit_throughput(observations, priors=None, start=None) -> ThroughputParams
  predict_step_time(params, num_nodes, num_replicas, micro_batch, accum_steps) -> float   seconds
  predict_step_times(params, num_nodes, num_replicas, micro_batch, accum_steps) -> np.ndarray   the same over
      arrays of allocations and shapes at once (the scheduler scores thousands per round)
  default_priors(observations) -> ThroughputParams
  probe_max_micro_batch(fits, start, limit, resolution=0) -> int

The model (Qiao et al., OSDI 2021, section 3.2): one forward/backward of `m` samples on one replica takes
T_grad(m) = alpha_c + beta_c * m; the gradient all-reduce over K replicas takes T_sync = alpha_r + beta_r *
max(K - 2, 0) when they share a node and alpha_n + beta_n * max(K - 2, 0) across nodes (0 for one replica);
the last backward overlaps the all-reduce, T_opt = (T_grad^gamma + T_sync^gamma)^(1/gamma) with gamma in
[1, 10] (1: no overlap, large: perfect overlap). `accum_steps` counts the micro-batches of one step on one
replica (so the global batch is K * m * accum_steps); the first accum_steps - 1 of them do not synchronize:
T_step = (accum_steps - 1) * T_grad + T_opt.

The fit is least squares on log step times (relative errors, so a 10 ms step and a 10 s step weigh the same),
bounded (every time parameter positive, gamma in [1, 10]) and regularized towards priors in log space: weakly
for every parameter, strongly for the ones the observations cannot identify (no multi-replica step: the sync
parameters; no multi-node step: the cross-node ones; one micro-batch size: the split between alpha_c and
beta_c). That is what lets a job that has only ever run on one GPU still predict, pessimistically but
sensibly, what four GPUs on two nodes would give it: the scheduler needs predictions for unseen allocations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterable

import numpy as np

from glassbox.errors import GlassboxError

GAMMA_BOUNDS = (1.0, 10.0)
WEAK_PRIOR = 0.05       # weight of a prior on an identified parameter, per log unit, against one observation
STRONG_PRIOR = 3.0      # weight of a prior on a parameter the observations cannot identify


@dataclass(frozen=True)
class ThroughputParams:
    alpha_c: float      # seconds: fixed cost of one forward/backward
    beta_c: float       # seconds per sample of one forward/backward
    alpha_r: float      # seconds: all-reduce among replicas of one node
    beta_r: float       # seconds per replica beyond two, within a node
    alpha_n: float      # seconds: all-reduce across nodes
    beta_n: float       # seconds per replica beyond two, across nodes
    gamma: float        # overlap of the last backward with the all-reduce, in [1, 10]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> "ThroughputParams":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise GlassboxError(f"throughput parameters: missing {', '.join(missing)}")
        return cls(**{n: float(data[n]) for n in names})


@dataclass(frozen=True)
class StepObservation:
    num_nodes: int
    num_replicas: int
    micro_batch: int
    accum_steps: int    # micro-batches per step on one replica
    step_time: float    # seconds

    def check(self, where: str) -> None:
        if self.num_nodes < 1 or self.num_replicas < self.num_nodes:
            raise GlassboxError(f"{where}: {self.num_replicas} replicas on {self.num_nodes} nodes is not an "
                                f"allocation (nodes >= 1, replicas >= nodes)")
        if self.micro_batch < 1 or self.accum_steps < 1:
            raise GlassboxError(f"{where}: micro_batch ({self.micro_batch}) and accum_steps ({self.accum_steps}) "
                                f"must be >= 1")
        if not (math.isfinite(self.step_time) and self.step_time > 0):
            raise GlassboxError(f"{where}: step_time must be a positive number of seconds, got {self.step_time}")


def _times(p: np.ndarray, nodes: np.ndarray, replicas: np.ndarray, micro: np.ndarray,
           accum: np.ndarray) -> np.ndarray:
    """Vectorized T_step for parameter vector p = [alpha_c, beta_c, alpha_r, beta_r, alpha_n, beta_n, gamma]."""
    alpha_c, beta_c, alpha_r, beta_r, alpha_n, beta_n, gamma = p
    t_grad = alpha_c + beta_c * micro
    extra = np.maximum(replicas - 2, 0)
    t_sync = np.where(nodes > 1, alpha_n + beta_n * extra, alpha_r + beta_r * extra)
    t_sync = np.where(replicas > 1, t_sync, 0.0)
    # (a^g + b^g)^(1/g) computed as max * (1 + (min/max)^g)^(1/g): no overflow for gamma up to 10.
    hi = np.maximum(t_grad, t_sync)
    lo = np.minimum(t_grad, t_sync)
    t_opt = hi * (1.0 + (lo / hi) ** gamma) ** (1.0 / gamma)
    return (accum - 1) * t_grad + t_opt


def _vector(params: ThroughputParams) -> np.ndarray:
    return np.array([getattr(params, f.name) for f in fields(ThroughputParams)], dtype=float)


def predict_step_times(params: ThroughputParams, num_nodes, num_replicas, micro_batch, accum_steps) -> np.ndarray:
    """Seconds per optimizer step for each element of the (broadcast) arrays of allocations and batch shapes."""
    args = [np.asarray(a, dtype=float) for a in (num_nodes, num_replicas, micro_batch, accum_steps)]
    return _times(_vector(params), *np.broadcast_arrays(*args))


def predict_step_time(params: ThroughputParams, num_nodes: int, num_replicas: int, micro_batch: int,
                      accum_steps: int) -> float:
    """Seconds per optimizer step of global batch num_replicas * micro_batch * accum_steps."""
    return float(predict_step_times(params, [num_nodes], [num_replicas], [micro_batch], [accum_steps])[0])


def default_priors(observations: list[StepObservation]) -> ThroughputParams:
    """Priors scaled to the job's own compute time, for allocations it has not run on.

    tau is the median time of one micro-batch pass; a pass is assumed mostly per-sample work (80%), an
    all-reduce within a node 15% of a pass, across nodes 50%, each further replica 2% (5% across nodes), and
    modest overlap (gamma 2). Deliberately a little pessimistic about scaling out: a wrong optimistic prior makes
    the scheduler hand GPUs to a job that cannot use them, a pessimistic one is corrected by the first
    observation on the new allocation.
    """
    per_pass = np.array([o.step_time / o.accum_steps for o in observations])
    micro = np.array([o.micro_batch for o in observations], dtype=float)
    tau, m = float(np.median(per_pass)), float(np.median(micro))
    return ThroughputParams(alpha_c=0.2 * tau, beta_c=0.8 * tau / m, alpha_r=0.15 * tau, beta_r=0.02 * tau,
                            alpha_n=0.5 * tau, beta_n=0.05 * tau, gamma=2.0)


def fit_throughput(observations: Iterable[StepObservation], priors: ThroughputParams | None = None,
                   start: ThroughputParams | None = None) -> ThroughputParams:
    """Bounded least squares on log step times, regularized towards `priors` (default_priors when None), from
    `start` (the previous fit, when refitting as observations accumulate: a few iterations instead of ~100) or
    else from the priors."""
    obs = list(observations)
    if not obs:
        raise GlassboxError("fit_throughput: no step observations to fit")
    for i, o in enumerate(obs):
        o.check(f"fit_throughput: observation {i}")
    priors = priors or default_priors(obs)
    nodes = np.array([o.num_nodes for o in obs], dtype=float)
    replicas = np.array([o.num_replicas for o in obs], dtype=float)
    micro = np.array([o.micro_batch for o in obs], dtype=float)
    accum = np.array([o.accum_steps for o in obs], dtype=float)
    log_t = np.log(np.array([o.step_time for o in obs]))

    # Which parameters the data can identify (the rest lean on their priors).
    local_sync = (nodes == 1) & (replicas > 1)
    remote_sync = nodes > 1
    identified = {
        "alpha_c": len(set(micro.tolist())) > 1, "beta_c": True,
        "alpha_r": bool(local_sync.any()), "beta_r": bool((local_sync & (replicas > 2)).any()),
        "alpha_n": bool(remote_sync.any()), "beta_n": bool((remote_sync & (replicas > 2)).any()),
        "gamma": bool((replicas > 1).any()) and len(set((accum * 1000 + micro).tolist())) > 1,
    }
    names = [f.name for f in fields(ThroughputParams)]
    prior = np.array([getattr(priors, n) for n in names], dtype=float)
    weights = np.array([WEAK_PRIOR if identified[n] else STRONG_PRIOR for n in names])
    # Fitted in log space for the six times (positive, and their errors relative), linearly for gamma.
    scale = float(np.exp(log_t.mean()))
    lower = np.array([math.log(scale * 1e-9)] * 6 + [GAMMA_BOUNDS[0]])
    upper = np.array([math.log(scale * 1e3)] * 6 + [GAMMA_BOUNDS[1]])
    x_prior = np.concatenate([np.log(np.maximum(prior[:6], scale * 1e-9)), [prior[6]]])
    if start is not None:
        begin = np.array([getattr(start, n) for n in names], dtype=float)
        x0 = np.concatenate([np.log(np.maximum(begin[:6], scale * 1e-9)), begin[6:]])
    else:
        x0 = x_prior
    x0 = np.clip(x0, lower + 1e-9, upper - 1e-9)

    def params_of(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.exp(x[:6]), x[6:]])

    def residuals(x: np.ndarray) -> np.ndarray:
        """Residuals at x, or at each column of x (7 x K: the Jacobian's probes in one vectorized call)."""
        cols = x.reshape(len(names), -1)
        times = _times(params_of(cols), nodes[:, None], replicas[:, None], micro[:, None], accum[:, None])
        fit = np.log(times) - log_t[:, None]
        # gamma's prior residual in the same units as a log-time parameter's: a tenth of its range per unit.
        reg = weights[:, None] * np.concatenate([cols[:6] - x_prior[:6, None], (cols[6:] - x_prior[6:, None]) / 3.0])
        out = np.concatenate([fit, reg / math.sqrt(len(obs))])
        return out if x.ndim == 2 else out[:, 0]

    x = bounded_least_squares(residuals, x0, lower, upper)
    return ThroughputParams(**dict(zip(names, params_of(x).tolist())))


def bounded_least_squares(residuals: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, lower: np.ndarray,
                          upper: np.ndarray, iterations: int = 300) -> np.ndarray:
    """Levenberg-Marquardt with every step projected into the box [lower, upper].

    Seven parameters and a few dozen residuals: a forward-difference Jacobian is cheap, and numpy alone keeps
    the fit runnable wherever training runs (a GPU image without scipy). `residuals` takes a parameter vector or
    a matrix of them as columns (returning a column of residuals each), so the Jacobian's seven probes are one
    call: on the 2-core CPU, where the fit was two thirds of a Pollux decision, decisions in the tiny model's
    bench went from ~2.5 to ~1.7 ms.
    """
    x = np.clip(x0, lower, upper)
    r = residuals(x)
    cost = float(r @ r)
    damping = 1e-3
    for _ in range(iterations):
        h = 1e-7 * np.maximum(1.0, np.abs(x))
        # Differences towards the inside of the box, so no probe leaves it.
        steps = np.where(x + h <= upper, h, -h)
        jac = (residuals(x[:, None] + np.diag(steps)) - r[:, None]) / steps
        jtj, jtr = jac.T @ jac, jac.T @ r
        improved = False
        while damping < 1e12:
            delta = np.linalg.solve(jtj + damping * (np.diag(np.diag(jtj)) + 1e-12 * np.eye(x.size)), -jtr)
            candidate = np.clip(x + delta, lower, upper)
            r_new = residuals(candidate)
            new_cost = float(r_new @ r_new)
            if new_cost < cost:
                converged = cost - new_cost <= 1e-14 * max(cost, 1e-300)
                x, r, cost, improved = candidate, r_new, new_cost, True
                damping = max(damping / 3.0, 1e-12)
                break
            damping *= 4.0
        if not improved or converged:
            break
    return x


def probe_max_micro_batch(fits: Callable[[int], bool], start: int, limit: int, resolution: float = 0.0) -> int:
    """The largest micro-batch in [1, limit] for which `fits(m)` holds: doubling from `start`, then bisection.

    `fits` runs a real forward/backward of m samples and says whether it completed (False on out-of-memory);
    it is assumed monotone (if m fits, every smaller m fits). Bisection stops once the bracket is within
    `resolution` of the lower end (0: exact), which bounds the probe to ~log2(limit / start) + log2(1 /
    resolution) passes: each pass near the memory wall is the largest forward/backward the job will ever run.
    Raises when not even one sample fits.
    """
    if limit < 1:
        raise GlassboxError(f"probe_max_micro_batch: limit must be >= 1, got {limit}")
    if not 0.0 <= resolution < 1.0:
        raise GlassboxError(f"probe_max_micro_batch: resolution must be in [0, 1), got {resolution}")
    m = max(1, min(start, limit))
    if not fits(m):
        hi = m
        lo = 0
    else:
        lo = m
        while lo < limit:
            nxt = min(limit, lo * 2)
            if not fits(nxt):
                hi = nxt
                break
            lo = nxt
        else:
            return lo
    while hi - lo > max(1, int(resolution * lo)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise GlassboxError("probe_max_micro_batch: not even a micro-batch of one sample fits in memory")
    return lo
