"""PolluxSched: a genetic algorithm over job-to-GPU allocations that maximizes the fair (power-mean, p = -1)
average of the jobs' goodput speedups (Qiao et al., OSDI 2021, section 4).

A candidate is a matrix `state[j, n]`: GPUs of node n given to job j. Its fitness is the power mean with p = -1
(a harmonic mean: one starved job drags it down far more than one favoured job lifts it) of each job's speedup,
the job's best goodput on that allocation over its goodput at an equal share of the cluster, taken from the job's
own goodput model (`JobView.speedup`). A job whose allocation changes is charged for the restart: its speedup is
scaled by max(age - 30 s x restarts, 0) / (age + 30 s), so young or often-moved jobs are not moved for small gains.

Constraints, enforced by a repair step on every candidate: no node gives out more GPUs than it has; no job gets
more than its `max_replicas`; at most one distributed (multi-node) job per node, since two all-reduces sharing a
node's network interfere. The search is warm-started each round from the previous round's population (the jobs
that are still there keep their rows), so a few dozen generations suffice, and the current allocation is always
in the population: a round never returns something worse than not moving anything.
"""

from __future__ import annotations

import numpy as np

from glassbox.elastic.sched.policy import Allocation, JobView
from glassbox.elastic.sched.workload import Cluster

POWER = -1.0
RESTART_PENALTY = 30.0     # seconds a reallocation costs a job (checkpoint, restart, reload)
FLOOR = 1e-3               # added to every speedup so a job with nothing keeps the power mean finite


class PolluxPolicy:
    name = "pollux"
    adaptive = True
    elastic = True

    def __init__(self, population: int = 64, generations: int = 40, seed: int = 0,
                 restart_penalty: float = RESTART_PENALTY):
        self.population = population
        self.generations = generations
        self.restart_penalty = restart_penalty
        self.rng = np.random.default_rng(seed)
        self._prev: np.ndarray | None = None
        self._prev_jobs: list[str] = []

    # -- the problem --------------------------------------------------------------------------------------------

    def _setup(self, jobs: list[JobView], cluster: Cluster, current: dict[str, Allocation]) -> None:
        self.num_nodes, self.capacity = cluster.num_nodes, cluster.gpus_per_node
        self.base = np.zeros((len(jobs), cluster.num_nodes), dtype=np.int64)
        for j, job in enumerate(jobs):
            if job.name in current:
                self.base[j] = current[job.name]
        self.max_replicas = np.array([min(j.max_replicas, cluster.num_gpus) for j in jobs], dtype=np.int64)
        self.table = np.stack([j.speedup for j in jobs])                    # (jobs, nodes + 1, gpus + 1)
        age = np.array([j.age for j in jobs], dtype=float)
        restarts = np.array([j.num_restarts for j in jobs], dtype=float)
        self.restart_factor = np.maximum(age - restarts * self.restart_penalty, 0.0) / (age + self.restart_penalty)
        # A speedup of 1 means one node's worth of GPUs at fair share: the artifact's scaling, kept so the FLOOR
        # weighs the same as there.
        self.scale = cluster.num_nodes / cluster.num_gpus

    def fitness(self, states: np.ndarray) -> np.ndarray:
        """Power mean (p = -1) of restart-penalized speedups, one value per candidate in `states` (P, J, N)."""
        nodes = np.count_nonzero(states, axis=2)
        replicas = states.sum(axis=2)
        jobs = np.arange(states.shape[1])[None, :]
        speedup = self.table[jobs, nodes, replicas] * self.scale
        moved = np.any(states != self.base[None], axis=2)
        speedup = np.where(moved, speedup * self.restart_factor[None, :], speedup)
        return np.mean((speedup + FLOOR) ** POWER, axis=1) ** (1.0 / POWER)

    def repair(self, states: np.ndarray) -> np.ndarray:
        """Make every candidate feasible (see the module docstring), earlier jobs (less attained service) first."""
        states = states.copy()
        # At most one distributed job per node: the first in job order keeps it.
        distributed = np.count_nonzero(states, axis=2) > 1
        on_node = (states > 0) & distributed[:, :, None]
        states[on_node & (np.cumsum(on_node, axis=1) > 1)] = 0
        # At most max_replicas per job, trimming nodes in a random order.
        order = np.argsort(self.rng.random(states.shape), axis=2)
        shuffled = np.take_along_axis(states, order, axis=2)
        capped = np.minimum(np.cumsum(shuffled, axis=2), self.max_replicas[None, :, None])
        shuffled = np.diff(capped, axis=2, prepend=0)
        states = np.take_along_axis(shuffled, np.argsort(order, axis=2), axis=2)
        # No node over capacity: jobs earlier in order keep their GPUs.
        capped = np.minimum(np.cumsum(states, axis=1), self.capacity)
        return np.diff(capped, axis=1, prepend=0)

    # -- the genetic operators ----------------------------------------------------------------------------------

    def crossover(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Single-point crossover over jobs: each child takes the first k jobs' rows from one parent."""
        points = self.rng.integers(0, a.shape[1], size=(a.shape[0], 1, 1))
        first = np.arange(a.shape[1])[None, :, None] < points
        return np.where(first, a, b), np.where(first, b, a)

    def mutate(self, states: np.ndarray) -> np.ndarray:
        states = states.copy()
        p, j, n = states.shape
        # Some jobs go back to their current allocation (keeps restarts rare) ...
        reset = self.rng.random((p, j)) < 0.1
        states = np.where(reset[:, :, None], self.base[None], states)
        # ... some lose a few of their GPUs ...
        thin = self.rng.random((p, j, 1)) < 0.1
        states[thin & (self.rng.random((p, j, n)) < 0.1)] = 0
        # ... and some grow, onto nodes with free GPUs, preferring the nodes they are already on.
        free = self.capacity - states.sum(axis=1, keepdims=True)                    # (P, 1, N)
        open_node = np.broadcast_to(free >= 1, states.shape)
        prob1 = open_node / np.maximum(open_node.sum(axis=2, keepdims=True), 1)
        own = open_node & (states > 0)
        prob2 = own / np.maximum(own.sum(axis=2, keepdims=True), 1)
        grow = self.rng.random(states.shape) < prob1 + prob2 - prob1 * prob2
        target = self.rng.integers(states, self.capacity + 1)
        states[grow] = target[grow]
        return states

    # -- one round ----------------------------------------------------------------------------------------------

    def _initial(self, names: list[str]) -> np.ndarray:
        pop = np.repeat(self.base[None], self.population, axis=0)
        if self._prev is not None:
            index = {n: i for i, n in enumerate(self._prev_jobs)}
            keep = [(j, index[n]) for j, n in enumerate(names) if n in index]
            if keep and self._prev.shape[2] == self.num_nodes:
                dst, src = (list(x) for x in zip(*keep))
                warm = np.zeros_like(pop)
                k = min(len(self._prev), self.population)
                warm[:k][:, dst] = self._prev[:k][:, src]
                pop[1:k] = warm[1:k]
        pop[1:] = self.mutate(pop[1:])
        return self.repair(pop)

    def search(self, jobs: list[JobView], cluster: Cluster, current: dict[str, Allocation]) -> np.ndarray:
        """The best state found for `jobs` (in the order given) and its population, for tests and callers."""
        self._setup(jobs, cluster, current)
        pop = self._initial([j.name for j in jobs])
        pop[0] = self.repair(self.base[None])[0]
        fit = self.fitness(pop)
        for _ in range(self.generations):
            # Binary tournaments pick parents; children are crossed, mutated and repaired; the best of parents
            # and children survive.
            idx = self.rng.integers(0, len(pop), size=(2, len(pop)))
            parents = pop[np.where(fit[idx[0]] >= fit[idx[1]], idx[0], idx[1])]
            half = len(parents) // 2
            c1, c2 = self.crossover(parents[:half], parents[half: 2 * half])
            children = self.repair(self.mutate(np.concatenate([c1, c2])))
            pool = np.concatenate([pop, children])
            pool_fit = np.concatenate([fit, self.fitness(children)])
            best = np.argsort(-pool_fit, kind="stable")[: self.population]
            pop, fit = pool[best], pool_fit[best]
        self._prev, self._prev_jobs = pop, [j.name for j in jobs]
        return pop

    def allocate(self, now: float, jobs: list[JobView], cluster: Cluster,
                 current: dict[str, Allocation]) -> dict[str, Allocation]:
        if not jobs:
            return {}
        # Jobs with less attained service come first: the repair step lets earlier jobs keep contested GPUs.
        order = sorted(jobs, key=lambda j: (j.attained_service, j.arrival, j.name))
        best = self.search(order, cluster, current)[0]
        return {job.name: tuple(best[j].tolist()) for j, job in enumerate(order) if best[j].any()}
