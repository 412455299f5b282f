"""Tiresias-like: discretized least-attained-service with the users' fixed requests (Gu et al., NSDI 2019).

Jobs sit in two priority queues by the GPU time they have received: new jobs in the first; a job that has used
more than 16 GPU-hours moves to the second. Each round, jobs run in queue order (first-come first-served within a
queue) while their requested GPUs fit, skipping any that do not (so small jobs backfill); a running job that no
longer makes the cut is preempted and resumes later from its checkpoint. Requests never change: Tiresias knows
nothing of a job's scalability or batch size, which is what Pollux adds.
"""

from __future__ import annotations

from glassbox.elastic.sched.policy import Allocation, JobView, free_gpus, pack
from glassbox.elastic.sched.workload import Cluster

QUEUE_THRESHOLD = 16 * 3600.0     # GPU-seconds before a job is demoted to the second queue


class TiresiasPolicy:
    name = "tiresias"
    adaptive = False
    elastic = False

    def __init__(self, threshold: float = QUEUE_THRESHOLD):
        self.threshold = threshold
        self.queues: tuple[list[str], list[str]] = ([], [])

    def allocate(self, now: float, jobs: list[JobView], cluster: Cluster,
                 current: dict[str, Allocation]) -> dict[str, Allocation]:
        by_name = {j.name: j for j in jobs}
        high, low = (list(q) for q in self.queues)
        high = [n for n in high if n in by_name]
        low = [n for n in low if n in by_name]
        for job in sorted(jobs, key=lambda j: (j.arrival, j.name)):
            if job.name not in high and job.name not in low:
                high.append(job.name)
        for name in list(high):
            if by_name[name].attained_service >= self.threshold:
                high.remove(name)
                low.append(name)
        self.queues = (high, low)
        budget = cluster.num_gpus
        running = []
        for name in high + low:
            need = by_name[name].requested_replicas
            if need <= budget:
                running.append(name)
                budget -= need
        allocations = {n: current[n] for n in running if n in current}
        free = free_gpus(cluster, allocations)
        for name in running:
            if name not in allocations:
                allocations[name] = tuple(pack(free, by_name[name].requested_replicas).tolist())
        return allocations
