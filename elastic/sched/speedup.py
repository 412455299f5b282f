"""Every allocation's best goodput for one job at once, computed with the Pollux agent's own models.

The scheduler's genetic algorithm scores thousands of candidate allocations per round, so it needs a job's
speedup for every (nodes, replicas) pair, every round. `GoodputModel.best` answers one pair at a time (~1 ms);
this module is the batch form of exactly that computation: the same candidate shapes (`GoodputModel.candidates`,
cached per replica count since they depend only on the job type), the same step-time model (the agent's
`predict_step_times`) and the same efficiency function, evaluated together in one array pass. It is an adapter,
not a second model: tests/elastic/test_sched_speedup.py checks it against `GoodputModel.best` pair by pair.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from glassbox.elastic.goodput import GoodputModel, efficiency
from glassbox.elastic.throughput import ThroughputParams, predict_step_times


@dataclass(frozen=True)
class JobShape:
    """What bounds a job's batch shapes: its initial (user) batch, largest batch, and micro-batch range."""

    init_batch: int
    max_batch: int
    min_micro: int
    max_micro: int


@dataclass(frozen=True)
class _Grid:
    nodes: np.ndarray       # per candidate (pair x shape)
    replicas: np.ndarray
    micro: np.ndarray
    accum: np.ndarray
    batches: np.ndarray     # the distinct global batches, and each candidate's index into them
    batch_index: np.ndarray
    pair_nodes: np.ndarray  # per (nodes, replicas) pair, and each candidate's pair
    pair_replicas: np.ndarray
    pair_index: np.ndarray


@functools.lru_cache(maxsize=256)
def _shapes(shape: JobShape, replicas: int) -> tuple[tuple[int, int], ...]:
    probe = GoodputModel(ThroughputParams(1, 1, 1, 1, 1, 1, 1), 1.0, 0.0, shape.init_batch)
    return tuple(probe.candidates(replicas, shape.max_batch, (shape.min_micro, shape.max_micro)))


@functools.lru_cache(maxsize=256)
def _grid(shape: JobShape, max_replicas: int, max_nodes: int) -> _Grid:
    cols: list[list[int]] = [[], [], [], [], []]
    pairs_n, pairs_r = [], []
    for r in range(1, max_replicas + 1):
        shapes = _shapes(shape, r)
        if not shapes:
            continue
        for n in range(1, min(r, max_nodes) + 1):
            for micro, accum in shapes:
                for col, v in zip(cols, (n, r, micro, accum, len(pairs_n))):
                    col.append(v)
            pairs_n.append(n)
            pairs_r.append(r)
    nodes, replicas, micro, accum, pair = (np.asarray(c, dtype=np.int64) for c in cols)
    batches, batch_index = np.unique(replicas * micro * accum, return_inverse=True)
    return _Grid(nodes, replicas, micro, accum, batches, batch_index, np.asarray(pairs_n, dtype=np.int64),
                 np.asarray(pairs_r, dtype=np.int64), pair)


def goodput_table(params: ThroughputParams, grad_sqr: float, grad_var: float, shape: JobShape,
                  max_replicas: int, max_nodes: int) -> np.ndarray:
    """table[n, r] = GoodputModel(...).best(n, r, ...).goodput for 1 <= n <= min(r, max_nodes) and
    1 <= r <= max_replicas; 0 where no batch shape fits (and for n = 0 or r = 0)."""
    table = np.zeros((max_nodes + 1, max_replicas + 1))
    grid = _grid(shape, max_replicas, max_nodes)
    if grid.nodes.size == 0:
        return table
    step = predict_step_times(params, grid.nodes, grid.replicas, grid.micro, grid.accum)
    eff = np.array([efficiency(grad_sqr, grad_var, shape.init_batch, int(b)) for b in grid.batches])
    goodput = grid.batches[grid.batch_index] / step * eff[grid.batch_index]
    best = np.zeros(grid.pair_nodes.size)
    np.maximum.at(best, grid.pair_index, goodput)
    table[grid.pair_nodes, grid.pair_replicas] = best
    return table
