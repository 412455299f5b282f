"""Pollux's goodput: throughput times statistical efficiency, and the batch shape that maximizes it.

API (stable; the cluster scheduler in glassbox.elastic.sched imports it):
  efficiency(grad_sqr, grad_var, init_batch, batch) -> float           E(M) in (0, 1]
  noise_scale(grad_sqr, grad_var, init_batch) -> float                  phi, in samples
  Choice(batch, micro_batch, accum_steps, goodput)                      a batch shape and its predicted goodput
  GoodputModel(params, grad_sqr, grad_var, init_batch, measured=None)
    .goodput(num_nodes, num_replicas, micro_batch, accum_steps) -> float   useful samples per second
    .best(num_nodes, num_replicas, max_batch, micro_batch_range) -> Choice
    .speedup(num_nodes, num_replicas, max_batch, micro_batch_range, base_replicas=1) -> float
  should_switch(current_goodput, candidate_goodput, threshold=0.05) -> bool

Gradient statistics follow AdaptDL's convention, so the OSDI'21 artifact's traces (validation-<bsz>.csv: grad_sqr,
grad_var) plug in unchanged: `grad_sqr` is |G|^2, the squared norm of the true gradient, and `grad_var` is the
variance of the gradient estimate at the job's initial batch `init_batch` (M0), i.e. tr(Sigma) / M0 with Sigma
the per-sample gradient covariance. The gradient noise scale is then phi = M0 * grad_var / grad_sqr samples, and
E(M) = (phi + M0) / (phi + M): the progress one sample makes at batch M relative to one at M0.

A batch shape is (replicas K, micro-batch m, accumulation a): global batch M = K * m * a. `best` evaluates about
fifty global batches geometrically spaced between M0 and `max_batch` (never below M0: Pollux only grows the
batch, the user's M0 being the size their hyperparameters were tuned for); for each, the fewest accumulation steps
whose micro-batch fits `micro_batch_range`, rounded so that M divides exactly (the trainer takes exactly M
samples per step). `speedup` is Pollux's SPEEDUP: the best goodput on an allocation over the best goodput on the
job's base allocation (`base_replicas` GPUs on one node), which is what the cluster scheduler's fitness averages.

`measured` maps shapes the job has run, (nodes, replicas, micro-batch, accumulation), to their observed step times
(medians): such a shape is priced by what it did and is a candidate of `best` beside the geometric ones, and the
fit prices the rest. The fit is a line in the micro-batch, and a GPU's pass time is not: flat while the kernels are
latency-bound, then linear. On the H200 (session 16) the fit through 32 and 64 priced 114 at 85 ms; it ran at 100,
and the refits through all three, compromises, priced 64 at 74-87 ms against the 72 it had run at, which kept the
run at 114 for 180 steps, below the goodput of 64 (the best fixed batch). Priced by their medians, 64 wins back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from glassbox.elastic.throughput import ThroughputParams, predict_step_time, predict_step_times
from glassbox.errors import GlassboxError

CANDIDATES = 50
SWITCH_THRESHOLD = 0.05


def noise_scale(grad_sqr: float, grad_var: float, init_batch: int) -> float:
    """phi = M0 * var / sqr in samples; infinite when the gradient's signal is zero (all noise)."""
    if grad_sqr <= 0:
        return math.inf
    return init_batch * max(grad_var, 0.0) / grad_sqr


def efficiency(grad_sqr: float, grad_var: float, init_batch: int, batch: int) -> float:
    """E(M) = (phi + M0) / (phi + M): 1 at M = M0, falling towards M0 / M when the gradient is noise-free."""
    if init_batch < 1 or batch < 1:
        raise GlassboxError(f"efficiency: batch sizes must be >= 1 (init_batch {init_batch}, batch {batch})")
    phi = noise_scale(grad_sqr, grad_var, init_batch)
    if math.isinf(phi):
        return 1.0
    return (phi + init_batch) / (phi + batch)


def should_switch(current_goodput: float, candidate_goodput: float, threshold: float = SWITCH_THRESHOLD) -> bool:
    """Change the batch shape only for a predicted gain above `threshold` (5%): every change costs a little
    (a new shape's first steps, a re-fit, noisier estimates), and flapping between near-equal shapes buys nothing."""
    return candidate_goodput > current_goodput * (1.0 + threshold)


@dataclass(frozen=True)
class Choice:
    batch: int
    micro_batch: int
    accum_steps: int
    goodput: float      # predicted useful (efficiency-weighted) samples per second

    def to_dict(self) -> dict:
        return {"batch": self.batch, "micro_batch": self.micro_batch, "accum_steps": self.accum_steps,
                "goodput": self.goodput}


ShapeKey = tuple[int, int, int, int]     # (nodes, replicas, micro-batch, accumulation steps)


class GoodputModel:
    def __init__(self, params: ThroughputParams, grad_sqr: float, grad_var: float, init_batch: int,
                 measured: Mapping[ShapeKey, float] | None = None):
        if init_batch < 1:
            raise GlassboxError(f"GoodputModel: init_batch must be >= 1, got {init_batch}")
        self.params = params
        self.grad_sqr = grad_sqr
        self.grad_var = grad_var
        self.init_batch = init_batch
        self.measured = {tuple(int(x) for x in key): float(t) for key, t in (measured or {}).items()}

    def step_time(self, num_nodes: int, num_replicas: int, micro_batch: int, accum_steps: int) -> float:
        """Seconds per step: the measured median where the shape has run, else the fit's prediction."""
        key = (num_nodes, num_replicas, micro_batch, accum_steps)
        if key in self.measured:
            return self.measured[key]
        return predict_step_time(self.params, *key)

    def efficiency(self, batch: int) -> float:
        return efficiency(self.grad_sqr, self.grad_var, self.init_batch, batch)

    def throughput(self, num_nodes: int, num_replicas: int, micro_batch: int, accum_steps: int) -> float:
        """Samples per second."""
        batch = num_replicas * micro_batch * accum_steps
        return batch / self.step_time(num_nodes, num_replicas, micro_batch, accum_steps)

    def goodput(self, num_nodes: int, num_replicas: int, micro_batch: int, accum_steps: int) -> float:
        batch = num_replicas * micro_batch * accum_steps
        return self.throughput(num_nodes, num_replicas, micro_batch, accum_steps) * self.efficiency(batch)

    def candidates(self, num_replicas: int, max_batch: int, micro_batch_range: tuple[int, int]
                   ) -> list[tuple[int, int]]:
        """(micro_batch, accum_steps) shapes of ~50 geometric global batches in [max(M0, K*m_min), max_batch]."""
        lo_micro, hi_micro = micro_batch_range
        if not 1 <= lo_micro <= hi_micro:
            raise GlassboxError(f"micro_batch_range {micro_batch_range}: need 1 <= min <= max")
        smallest = max(self.init_batch, num_replicas * lo_micro)
        if max_batch < smallest:
            return []
        shapes: set[tuple[int, int]] = set()
        for target in np.geomspace(smallest, max_batch, CANDIDATES):
            per_replica = target / num_replicas
            accum = max(1, math.ceil(per_replica / hi_micro))
            micro = min(hi_micro, max(lo_micro, round(per_replica / accum)))
            batch = num_replicas * micro * accum
            if batch > max_batch:       # rounding up overshot: one sample fewer per micro-batch
                micro -= 1
                batch = num_replicas * micro * accum
            if micro >= lo_micro and batch >= self.init_batch:
                shapes.add((micro, accum))
        return sorted(shapes, key=lambda s: (s[0] * s[1], s[1]))

    def best(self, num_nodes: int, num_replicas: int, max_batch: int, micro_batch_range: tuple[int, int]
             ) -> Choice:
        """The candidate shape with the highest predicted goodput on `num_replicas` GPUs over `num_nodes`."""
        if num_replicas < 1 or num_nodes < 1 or num_nodes > num_replicas:
            raise GlassboxError(f"GoodputModel.best: {num_replicas} replicas on {num_nodes} nodes is not an "
                                f"allocation")
        shapes = self.candidates(num_replicas, max_batch, micro_batch_range)
        lo_micro, hi_micro = micro_batch_range
        ran = {(m, a) for (n, k, m, a) in self.measured if n == num_nodes and k == num_replicas and
               lo_micro <= m <= hi_micro and self.init_batch <= k * m * a <= max_batch}
        shapes = sorted(set(shapes) | ran, key=lambda s: (s[0] * s[1], s[1]))
        if not shapes:
            raise GlassboxError(f"GoodputModel.best: no batch shape of {num_replicas} replicas fits between the "
                                f"initial batch {self.init_batch} and max_batch {max_batch} with micro-batches in "
                                f"{micro_batch_range}")
        # Every candidate in one array pass (the scheduler's simulator asks this for every job every round); the
        # first of equal goodputs wins, as a loop keeping the strictly better one would.
        micro, accum = (np.array(c, dtype=float) for c in zip(*shapes))
        batches = num_replicas * micro * accum
        times = predict_step_times(self.params, num_nodes, num_replicas, micro, accum)
        for i, (m, a) in enumerate(shapes):
            times[i] = self.measured.get((num_nodes, num_replicas, m, a), times[i])
        goodputs = batches / times * np.array([self.efficiency(int(b)) for b in batches])
        i = int(np.argmax(goodputs))
        return Choice(int(batches[i]), shapes[i][0], shapes[i][1], float(goodputs[i]))

    def speedup(self, num_nodes: int, num_replicas: int, max_batch: int, micro_batch_range: tuple[int, int],
                base_replicas: int = 1) -> float:
        """Best goodput on this allocation over the best on `base_replicas` GPUs of one node (0 for no GPUs)."""
        if num_replicas == 0:
            return 0.0
        base = self.best(1, base_replicas, max_batch, micro_batch_range).goodput
        return self.best(num_nodes, num_replicas, max_batch, micro_batch_range).goodput / base
