"""The genetic algorithm respects its constraints and finds the allocation a hand calculation says is best."""

from __future__ import annotations

import numpy as np

from glassbox.elastic.sched.policy import JobView
from glassbox.elastic.sched.pollux import PolluxPolicy
from glassbox.elastic.sched.workload import Cluster


def view(name: str, table: np.ndarray, max_replicas: int, age: float = 1e6, restarts: int = 0) -> JobView:
    return JobView(name=name, arrival=0.0, age=age, attained_service=0.0, num_restarts=restarts,
                   requested_replicas=1, max_replicas=max_replicas, speedup=table)


def linear(cluster: Cluster, per_gpu: float = 1.0, cap: int | None = None) -> np.ndarray:
    r = np.arange(cluster.num_gpus + 1, dtype=float)
    n = np.arange(cluster.num_nodes + 1)[:, None]
    gain = np.minimum(r, cap) if cap else r
    return np.where((n >= 1) & (n <= r[None, :]), per_gpu * gain[None, :], 0.0)


def test_repair_enforces_capacity_max_replicas_and_one_distributed_job_per_node():
    cluster = Cluster(num_nodes=4, gpus_per_node=4)
    rng = np.random.default_rng(0)
    jobs = [view(f"j{i}", linear(cluster), max_replicas=int(rng.integers(1, 9))) for i in range(6)]
    policy = PolluxPolicy(population=32, generations=5, seed=1)
    policy._setup(jobs, cluster, {})
    raw = rng.integers(0, 5, size=(200, len(jobs), cluster.num_nodes))
    states = policy.repair(raw)
    assert states.min() >= 0
    assert (states.sum(axis=1) <= cluster.gpus_per_node).all()                     # node capacity
    assert (states.sum(axis=2) <= policy.max_replicas[None, :]).all()              # per-job cap
    distributed = np.count_nonzero(states, axis=2) > 1
    assert (((states > 0) & distributed[:, :, None]).sum(axis=1) <= 1).all()       # one multi-node job per node
    assert (states <= raw).all()                                                   # repair only removes GPUs
    # And what a whole search returns obeys the same rules.
    best = policy.search(jobs, cluster, {})[0]
    assert (best.sum(axis=0) <= 4).all() and (best.sum(axis=1) <= policy.max_replicas).all()


def test_search_finds_the_fair_optimum():
    """One node of 4 GPUs. Job a scales linearly; job b gains nothing past one GPU. The harmonic mean of speedups
    is best with a on 3 GPUs and b on 1 (1/(3) + 1/(1) beats every other split), with nothing left idle."""
    cluster = Cluster(num_nodes=1, gpus_per_node=4)
    jobs = [view("a", linear(cluster), 4), view("b", linear(cluster, cap=1), 4)]
    alloc = PolluxPolicy(population=32, generations=30, seed=0).allocate(0.0, jobs, cluster, {})
    assert alloc == {"a": (3,), "b": (1,)}


def test_restart_penalty_keeps_a_young_job_where_it_is():
    """Moving a job 10 s old costs it (age - 30 s x restarts) / (age + 30 s) = 1/4 of its speedup: a 20% gain
    from a second GPU does not pay, so the current allocation stays; an old job takes the GPU."""
    cluster = Cluster(num_nodes=1, gpus_per_node=2)
    table = np.zeros((2, 3))
    table[1, 1], table[1, 2] = 1.0, 1.2
    young = [view("a", table, 2, age=10.0, restarts=0)]
    assert PolluxPolicy(16, 20).allocate(0.0, young, cluster, {"a": (1,)}) == {"a": (1,)}
    old = [view("a", table, 2, age=1e5, restarts=0)]
    assert PolluxPolicy(16, 20).allocate(0.0, old, cluster, {"a": (1,)}) == {"a": (2,)}
