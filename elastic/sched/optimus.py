"""Optimus-like: GPUs go where they shorten remaining time the most, with the true step times (an oracle).

Optimus (Peng et al., EuroSys 2018) predicts each job's remaining steps and its step time on k workers, then hands
out GPUs one at a time to the job whose remaining time falls the most. Here the prediction is perfect (the
traces' own step times, "Optimus+Oracle" in the Pollux paper) and every job keeps its user's batch size: what
Optimus cannot do is change the batch, so it scales jobs whose fixed batch scales poorly. Every job first gets
one GPU (while they last), in arrival order.
"""

from __future__ import annotations

from glassbox.elastic.sched.policy import Allocation, JobView, free_gpus, pack
from glassbox.elastic.sched.workload import Cluster


class OptimusPolicy:
    name = "optimus"
    adaptive = False
    elastic = True

    def allocate(self, now: float, jobs: list[JobView], cluster: Cluster,
                 current: dict[str, Allocation]) -> dict[str, Allocation]:
        order = sorted(jobs, key=lambda j: (j.arrival, j.name))
        budget = cluster.num_gpus
        count: dict[str, int] = {}
        for job in order:
            count[job.name] = 1 if budget >= 1 else 0
            budget -= count[job.name]

        def gain(job: JobView) -> float:
            k = count[job.name]
            if k == 0 or k + 1 > job.max_replicas:
                return 0.0
            return (job.step_time(k) - job.step_time(k + 1)) * job.remaining_steps

        gains = {j.name: gain(j) for j in order}
        by_name = {j.name: j for j in order}
        while budget > 0 and gains and max(gains.values()) > 0:
            name = max(gains, key=lambda n: gains[n])
            count[name] += 1
            budget -= 1
            gains[name] = gain(by_name[name])
        allocations = {n: a for n, a in current.items() if n in count and sum(a) == count[n]}
        free = free_gpus(cluster, allocations)
        for name in sorted(count, key=lambda n: count[n]):
            if count[name] > 0 and name not in allocations:
                allocations[name] = tuple(pack(free, count[name]).tolist())
        return allocations
