"""A trace-driven cluster simulator: jobs train at the speed and statistical efficiency their measured traces say,
on the GPUs a policy gives them, one scheduling interval (60 s) at a time.

Each job advances in progress units (optimizer steps at its initial batch): a step of global batch M on an
allocation takes the trace's step time, and is worth gain(M) = (var + sqr) / (var / S + sqr), S = M / M0, of those
units, with the trace's true gradient statistics for the current epoch. A job finishes when it has made the
progress of all its epochs. A job whose allocation changes pauses `restart_delay` seconds (30 s: a checkpoint,
a restart, a reload), as in the artifact.

An adaptive (Pollux) job behaves like the Pollux agent: it records each step shape's observed time, re-fits the
agent's throughput model (`glassbox.elastic.throughput.fit_throughput`) whenever it sees a new shape, and at
every epoch boundary and reallocation picks the batch shape with the best predicted goodput
(`glassbox.elastic.goodput.GoodputModel.best`). Its speedup table for the scheduler comes from the same model.
Fixed jobs (Tiresias, FIFO, Optimus) keep the user's batch and split it over their GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from glassbox.elastic.goodput import GoodputModel
from glassbox.elastic.sched.policy import Allocation, JobView, Policy
from glassbox.elastic.sched.speedup import JobShape, goodput_table
from glassbox.elastic.sched.traces import ModelTrace
from glassbox.elastic.sched.workload import Cluster, JobSpec, WorkloadError, check_workload
from glassbox.elastic.throughput import StepObservation, ThroughputParams, fit_throughput

EPS = 1e-8
# The artifact runs NCF at a fixed 32768-sample batch on one GPU under every adaptive policy: its traces show no
# gain from more GPUs, and its epochs are seconds long.
FIXED_ADAPTIVE = {"ncf": 32768}


def fixed_shape(trace: ModelTrace, batch: int, replicas: int) -> tuple[int, int]:
    """(micro_batch, extra accumulation steps) splitting a fixed global batch over `replicas` GPUs: the fewest
    micro-batches that fit the model's largest local batch (at least two on one GPU above the initial batch, so
    the gradient-noise estimate has two micro-batches to compare, as the artifact does)."""
    local = math.ceil(batch / replicas - EPS)
    extra = math.ceil(local / trace.max_local_bsz - EPS) - 1
    if replicas == 1 and batch > trace.init_batch_size:
        extra = max(1, extra)
    micro = math.ceil(local / (extra + 1) - EPS)
    return min(micro, int(trace.max_batch_size / (replicas * (extra + 1)))), extra


@dataclass
class SimJob:
    spec: JobSpec
    trace: ModelTrace
    adaptive: bool
    target_batch: int | None
    allocation: Allocation = ()
    micro: int = 0
    extra_accum: int = 0
    progress: float = 0.0
    epoch: int = 0
    attained: float = 0.0
    restarts: int = -1               # the first allocation is a start, not a restart
    pause: float = 0.0
    completion: float | None = None
    observed: dict[tuple[int, int, int, int], float] = field(default_factory=dict)
    params: ThroughputParams | None = None
    grad: tuple[float, float] = (0.0, 0.0)

    @property
    def placement(self) -> tuple[int, ...]:
        """GPUs per node in ring order. A packing policy lays ranks out in the order it took the GPUs, largest
        node first (as the artifact's launcher did); Pollux in node order. The order matters beyond two nodes:
        the traces measure placements such as 1-2-3 and 1-3-2 separately."""
        counts = tuple(g for g in self.allocation if g)
        return counts if self.adaptive else tuple(sorted(counts, reverse=True))

    @property
    def shape(self) -> JobShape:
        t = self.trace
        return JobShape(t.init_batch_size, t.max_batch_size, t.min_local_bsz, t.max_local_bsz)

    def model(self) -> GoodputModel:
        return GoodputModel(self.params, self.grad[0], self.grad[1], self.trace.init_batch_size)

    def choose_shape(self) -> None:
        """Pick (micro, accumulation) for the current placement: the user's batch split over the GPUs, or for an
        adaptive job the shape of best predicted goodput (the initial batch before any model exists)."""
        p = self.placement
        if not p:
            self.micro = self.extra_accum = 0
            return
        nodes, replicas = len(p), sum(p)
        t = self.trace
        if self.target_batch is not None:
            self.micro, self.extra_accum = fixed_shape(t, self.target_batch, replicas)
        elif self.params is None:
            self.micro, self.extra_accum = fixed_shape(t, max(t.init_batch_size, t.min_local_bsz * replicas),
                                                       replicas)
        else:
            choice = self.model().best(nodes, replicas, t.max_batch_size, (t.min_local_bsz, t.max_local_bsz))
            self.micro, self.extra_accum = choice.micro_batch, choice.accum_steps - 1

    def observe(self, step_time: float, grad: tuple[float, float]) -> None:
        self.grad = grad
        p = self.placement
        key = (len(p), sum(p), self.micro, self.extra_accum + 1)
        if key in self.observed:
            return
        self.observed[key] = step_time
        self.params = fit_throughput([StepObservation(*k, step_time=v) for k, v in self.observed.items()],
                                     start=self.params)

    def advance(self, now: float, seconds: float) -> None:
        """Train for `seconds` of wall time starting at `now` (or wait, with no GPUs)."""
        p = self.placement
        if not p or self.completion is not None:
            return
        gpus = sum(p)
        delay = min(self.pause, seconds)
        self.pause -= delay
        self.attained += delay * gpus
        now += delay
        seconds -= delay
        t = self.trace
        while seconds > 0 and self.completion is None:
            batch = gpus * self.micro * (self.extra_accum + 1)
            step, sync = t.step_time(p, self.micro)
            step_time = step + (step - sync) * self.extra_accum
            sqr, var = t.grad_stats(batch, self.epoch)
            scale = batch / t.init_batch_size
            gain = (var + sqr) / (var / scale + sqr)
            if self.adaptive:
                self.observe(step_time, (sqr, var))
            rate = gain / step_time
            goal = t.epoch_progress[self.epoch + 1]
            if self.progress + rate * seconds < goal:
                self.progress += rate * seconds
                self.attained += seconds * gpus
                seconds = 0.0
            else:
                # The epoch ends inside this interval: the artifact counts whole seconds to its end.
                used = min(float(round((goal - self.progress) / rate)), seconds)
                self.epoch += 1
                self.progress = goal
                self.attained += used * gpus
                now += used
                seconds -= used
                if self.epoch >= t.max_epochs:
                    self.completion = now
                    return
            self.choose_shape()

    def reallocate(self, allocation: Allocation, restart_delay: float) -> None:
        self.allocation = allocation if any(allocation) else ()
        if self.allocation:
            self.restarts += 1
            self.pause = restart_delay
        self.choose_shape()

    def max_replicas(self, num_gpus: int, elastic: bool) -> int:
        """The most GPUs a policy may give this job now. Fixed-request policies: the request. Elastic ones: what
        the batch can be split over (one GPU for the fixed-batch NCF), and for Pollux at most twice the most
        replicas it has run on, so its model never extrapolates far past what it has observed."""
        t = self.trace
        if not elastic:
            return self.spec.num_replicas
        if self.spec.application in FIXED_ADAPTIVE:
            return 1
        if not self.adaptive:
            return min(num_gpus, self.target_batch // t.min_local_bsz)
        profiled = max((k[1] for k in self.observed), default=0)
        return min(max(2 * profiled, 1), num_gpus, t.max_batch_size // t.min_local_bsz)


@dataclass
class SimResult:
    policy: str
    jct: dict[str, float]
    restarts: dict[str, int]
    timeline: list[dict]

    @property
    def mean_jct(self) -> float:
        return float(np.mean(list(self.jct.values())))


def job_view(job: SimJob, now: float, cluster: Cluster, fair_replicas: int, elastic: bool) -> JobView:
    view = JobView(name=job.spec.name, arrival=job.spec.arrival, age=now - job.spec.arrival,
                   attained_service=job.attained, num_restarts=max(job.restarts, 0),
                   requested_replicas=job.spec.num_replicas,
                   max_replicas=job.max_replicas(cluster.num_gpus, elastic))
    t = job.trace
    if job.adaptive:
        table = np.zeros((cluster.num_nodes + 1, cluster.num_gpus + 1))
        r = np.arange(cluster.num_gpus + 1)
        valid = (np.arange(cluster.num_nodes + 1)[:, None] <= r[None, :]) & (
            np.arange(cluster.num_nodes + 1)[:, None] >= 1)
        if job.params is None:
            table = np.where(valid, r[None, :] / fair_replicas, 0.0)
        else:
            size = max(view.max_replicas, fair_replicas)
            g = goodput_table(job.params, job.grad[0], job.grad[1], job.shape, size, cluster.num_nodes)
            base = g[1, fair_replicas]
            rmax = min(size, cluster.num_gpus)
            table[:, : rmax + 1] = g[:, : rmax + 1] / base if base > 0 else 0.0
        view.speedup = table
    if job.target_batch is not None:
        end = t.max_epochs - 1
        view.remaining_steps = max(t.iterations(job.target_batch, end) - t.iterations(job.target_batch, job.epoch),
                                   1.0)

        def oracle(replicas: int, job: SimJob = job) -> float:
            placement, left = [], replicas
            while left > 0:
                placement.append(min(left, cluster.gpus_per_node))
                left -= placement[-1]
            # Optimus's own estimate splits the batch like the job does, except that it always assumes two
            # micro-batches on one GPU (the artifact's rule), which makes a second GPU look a little better.
            micro, extra = fixed_shape(job.trace, job.target_batch, replicas)
            if replicas == 1 and extra == 0:
                extra = 1
                micro = min(math.ceil(job.target_batch / 2 - EPS), int(job.trace.max_batch_size / 2))
            step, sync = job.trace.step_time(tuple(placement), micro)
            return step + (step - sync) * extra

        view.step_time = oracle
    return view


def simulate(jobs: list[JobSpec], traces: dict[str, ModelTrace], policy: Policy, cluster: Cluster,
             interval: float = 60.0, restart_delay: float = 30.0, max_hours: float = 24 * 30,
             source: str = "workload") -> SimResult:
    """Replay `jobs` under `policy` until every job has finished; returns each job's completion time."""
    check_workload(jobs, traces, cluster, source)
    adaptive = getattr(policy, "adaptive", False)       # jobs learn goodput models and choose their batch
    elastic = getattr(policy, "elastic", False)         # the policy chooses how many GPUs a job gets
    sim = []
    for spec in jobs:
        trace = traces[spec.application]
        target = FIXED_ADAPTIVE.get(spec.application) if adaptive else spec.batch_size
        sim.append(SimJob(spec, trace, adaptive=adaptive, target_batch=target))
    timeline: list[dict] = []
    now = 0.0
    while any(j.completion is None for j in sim):
        for job in sim:
            job.advance(now, interval)
        now += interval
        if now > max_hours * 3600:
            raise WorkloadError(f"{source}: jobs still running after {max_hours} simulated hours under "
                                f"{policy.name} (a request that never fits?)")
        active = [j for j in sim if j.spec.arrival <= now and j.completion is None]
        if not active:
            continue
        fair = math.ceil(cluster.num_gpus / len(active))
        views = [job_view(j, now, cluster, fair, elastic) for j in active]
        current = {j.spec.name: j.allocation for j in active if j.allocation}
        new = policy.allocate(now, views, cluster, current)
        used = np.zeros(cluster.num_nodes, dtype=np.int64)
        for name, alloc in new.items():
            used += np.asarray(alloc, dtype=np.int64)
        if np.any(used > cluster.gpus_per_node):
            raise AssertionError(f"{policy.name} over-allocated a node at t={now}: {used.tolist()}")
        for job in active:
            alloc = tuple(new.get(job.spec.name, ()))
            if not any(alloc):
                alloc = ()
            if alloc != job.allocation:
                job.reallocate(alloc, restart_delay)
        timeline.append({"time": now, "active": len(active), "gpus_used": int(used.sum()),
                         "running": sum(1 for j in active if j.allocation)})
    jct = {j.spec.name: j.completion - j.spec.arrival for j in sim}
    return SimResult(policy.name, jct, {j.spec.name: max(j.restarts, 0) for j in sim}, timeline)
