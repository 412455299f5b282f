"""Workloads: which jobs arrive when, training what, and what a user would have asked for.

A workload CSV has one row per job: `name, time, application, num_replicas, batch_size` (the artifact's format).
`time` is the arrival in seconds from the start; `application` names a model trace; `num_replicas` and
`batch_size` are the user's fixed request, which the fixed-request policies (Tiresias, FIFO) honour and Optimus
keeps the batch of, while Pollux ignores both and chooses for itself.

A request that cannot run is refused at load, naming the job and the row: an unknown model, more GPUs than the
cluster has, a batch outside the model's validated range, or a batch too small to give every replica its
smallest local batch.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from glassbox.errors import GlassboxError
from glassbox.elastic.sched.traces import ModelTrace

WORKLOAD_COLUMNS = ("name", "time", "application", "num_replicas", "batch_size")


class WorkloadError(GlassboxError):
    """A workload file or job that cannot be simulated: the message names the file, row and job."""


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster: `num_nodes` machines of `gpus_per_node` GPUs each (the artifact: 16 x 4)."""

    num_nodes: int = 16
    gpus_per_node: int = 4

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise WorkloadError(f"a cluster needs at least one node and one GPU per node, got {self.num_nodes} "
                                f"nodes x {self.gpus_per_node} GPUs")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass(frozen=True)
class JobSpec:
    """One job as submitted."""

    name: str
    arrival: float
    application: str
    num_replicas: int
    batch_size: int


def _int_cell(path: Path, line: int, column: str, cell: str, name: str) -> int:
    try:
        value = float(cell)
    except ValueError:
        raise WorkloadError(f"{path}: row {line} (job {name!r}), column {column}: {cell!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise WorkloadError(f"{path}: row {line} (job {name!r}), column {column}: {cell!r} is not a whole number")
    return int(value)


def read_workload(path: str | Path) -> list[JobSpec]:
    """The jobs of a workload CSV in arrival order, each row checked for shape (not yet against a cluster)."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: workload file not found")
    jobs: list[JobSpec] = []
    seen: dict[str, int] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in WORKLOAD_COLUMNS if c not in header]
        if missing:
            raise WorkloadError(f"{path}: missing column(s) {', '.join(missing)} "
                                f"(header has: {', '.join(header) or 'nothing'})")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            name = row["name"]
            if not name:
                raise WorkloadError(f"{path}: row {line}, column name: a job needs a name")
            if name in seen:
                raise WorkloadError(f"{path}: row {line}: job {name!r} repeats the name of row {seen[name]}")
            seen[name] = line
            try:
                arrival = float(row["time"])
            except ValueError:
                raise WorkloadError(f"{path}: row {line} (job {name!r}), column time: {row['time']!r} is not a "
                                    "number") from None
            if not math.isfinite(arrival) or arrival < 0:
                raise WorkloadError(f"{path}: row {line} (job {name!r}), column time: arrival must be >= 0")
            replicas = _int_cell(path, line, "num_replicas", row["num_replicas"], name)
            batch = _int_cell(path, line, "batch_size", row["batch_size"], name)
            if replicas < 1 or batch < 1:
                col = "num_replicas" if replicas < 1 else "batch_size"
                raise WorkloadError(f"{path}: row {line} (job {name!r}), column {col}: must be at least 1")
            if not row["application"]:
                raise WorkloadError(f"{path}: row {line} (job {name!r}), column application: empty")
            jobs.append(JobSpec(name, arrival, row["application"], replicas, batch))
    if not jobs:
        raise WorkloadError(f"{path}: no jobs")
    jobs.sort(key=lambda j: j.arrival)
    return jobs


def check_workload(jobs: list[JobSpec], traces: dict[str, ModelTrace], cluster: Cluster,
                   source: str = "workload") -> None:
    """Refuse, naming the job, any request the cluster or the job's model cannot satisfy."""
    for job in jobs:
        where = f"{source}: job {job.name!r}"
        trace = traces.get(job.application)
        if trace is None:
            raise WorkloadError(f"{where}: unknown application {job.application!r} (traces: "
                                f"{', '.join(sorted(traces))})")
        if job.num_replicas > cluster.num_gpus:
            raise WorkloadError(f"{where}: asks for {job.num_replicas} GPUs but the cluster has {cluster.num_gpus} "
                                f"({cluster.num_nodes} nodes x {cluster.gpus_per_node})")
        if not trace.init_batch_size <= job.batch_size <= trace.max_batch_size:
            raise WorkloadError(f"{where}: batch size {job.batch_size} is outside {job.application}'s validated "
                                f"range {trace.init_batch_size}-{trace.max_batch_size}")
        if job.batch_size < job.num_replicas * trace.min_local_bsz:
            raise WorkloadError(f"{where}: batch size {job.batch_size} cannot give each of {job.num_replicas} "
                                f"replicas the smallest local batch {trace.min_local_bsz}")
