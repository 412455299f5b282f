"""What a scheduling policy sees of each job and what it returns: the contract between the simulator (or the real
executor) and the policies.

An allocation is a tuple with one entry per node: how many of that node's GPUs the job holds. A policy returns an
allocation for every job it runs; a job left out holds nothing (it waits, or is preempted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from glassbox.elastic.sched.workload import Cluster

Allocation = tuple[int, ...]


@dataclass
class JobView:
    """One active job at a scheduling round."""

    name: str
    arrival: float
    age: float                      # seconds since arrival
    attained_service: float         # GPU-seconds received so far
    num_restarts: int
    requested_replicas: int         # the user's fixed request (Tiresias, FIFO)
    max_replicas: int               # the most GPUs this job may be given this round
    # Pollux: speedup[n, r] of r GPUs over n nodes relative to the job's fair share (None before any model).
    speedup: np.ndarray | None = None
    # Optimus: steps left at the job's fixed batch, and the true step time on r packed GPUs (the oracle).
    remaining_steps: float = 0.0
    step_time: Callable[[int], float] | None = None


class Policy(Protocol):
    name: str

    def allocate(self, now: float, jobs: list[JobView], cluster: Cluster,
                 current: dict[str, Allocation]) -> dict[str, Allocation]:
        """The allocations for the next interval, given the ones held now."""
        ...


def pack(free: np.ndarray, count: int) -> np.ndarray:
    """Take `count` GPUs from the nodes with the most free GPUs first (few nodes, little fragmentation);
    `free` is updated in place. The caller has checked that enough GPUs are free."""
    taken = np.zeros_like(free)
    while count > 0:
        node = int(np.argmax(free))
        n = min(int(free[node]), count)
        if n == 0:
            raise ValueError("pack: not enough free GPUs")
        taken[node] += n
        free[node] -= n
        count -= n
    return taken


def free_gpus(cluster: Cluster, allocations: dict[str, Allocation]) -> np.ndarray:
    free = np.full(cluster.num_nodes, cluster.gpus_per_node, dtype=np.int64)
    for alloc in allocations.values():
        free -= np.asarray(alloc, dtype=np.int64)
    return free
