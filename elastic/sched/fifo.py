"""FIFO: jobs start in arrival order with the GPUs they asked for, and keep them until they finish.

The baseline every cluster starts with: no preemption, no resizing, and head-of-line blocking (a large request
at the front waits for room, and everything behind it waits too), which is what makes its completion times long.
"""

from __future__ import annotations

from glassbox.elastic.sched.policy import Allocation, JobView, free_gpus, pack
from glassbox.elastic.sched.workload import Cluster


class FifoPolicy:
    name = "fifo"
    adaptive = False
    elastic = False

    def allocate(self, now: float, jobs: list[JobView], cluster: Cluster,
                 current: dict[str, Allocation]) -> dict[str, Allocation]:
        allocations = {j.name: current[j.name] for j in jobs if j.name in current}
        free = free_gpus(cluster, allocations)
        for job in sorted(jobs, key=lambda j: (j.arrival, j.name)):
            if job.name in allocations:
                continue
            if job.requested_replicas > free.sum():
                break
            allocations[job.name] = tuple(pack(free, job.requested_replicas).tolist())
        return allocations
