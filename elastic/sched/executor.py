"""A real executor for the scheduler's allocations: glassbox training jobs on a local Ray cluster.

Why Ray: the executor must sit on an existing resource manager, not be one. Ray installs from PyPI (CI has only
pip; Debian's slurm-wlm needs root, a munge key and two daemons, which a CI runner cannot set up), starts a
local cluster in-process with `ray.init`, and does the accounting a resource manager does: a job's allocation of
K worker slots is a Ray actor that reserves K of the cluster's slots, so Ray places it only when they are free
and releases them when it ends. On GPUs the slots are Ray's `num_gpus`; on this CPU box they are CPUs and each
slot is one gloo rank. A Kubernetes or Slurm backend would replace `TrainProcess` placement and nothing else (see
docs/elastic_scheduling.md).

A job run is one `glassbox train --nproc K` process tree inside its actor, or for an adaptive job one
`glassbox elastic run --nproc K` (the Pollux agent choosing batch, micro-batch and learning rate at the world size
the scheduler gives it; the scheduler, not the agent, resizes it). An adaptive job's agent reports its models in
metrics.jsonl (the "pollux" rows: fitted throughput parameters, gradient statistics, batch limits), and
`observed_speedup` turns the latest into the goodput table PolluxSched ranks allocations by, as Pollux's agents
report theirs to its scheduler; a plain job gets a throughput-only table fitted to its step times. Resizing a job stops that run (the
whole process group; checkpoints are committed by rename, so nothing half-written is ever resumed) and starts a
new one at the new world size with `--resume auto`: it continues from its latest checkpoint, with the same global
sample order (the data order does not depend on world size), so the run's metrics.jsonl is continuous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from glassbox.errors import GlassboxError


START_ATTEMPTS = 3


class ExecutorError(GlassboxError):
    """A job that cannot be run or failed while running: the message names the job and its log."""


@dataclass
class JobRequest:
    """A training job as submitted to the executor."""

    name: str
    config: str                     # run config path or bundled name
    run_dir: Path
    steps: int
    replicas: int = 1               # the user's request (fixed-request policies honour it)
    checkpoint_every: int = 2       # a resize resumes from the latest of these
    arrival: float = 0.0            # seconds after the executor starts
    overrides: list[str] = field(default_factory=list)
    adaptive: bool = False          # train under the Pollux agent (`glassbox elastic run`), which reports goodput
    elastic_overrides: list[str] = field(default_factory=list)     # the agent's --elastic-set KEY=VALUE

    def command(self, world_size: int) -> list[str]:
        launcher = ["elastic", "run"] if self.adaptive else ["train"]
        cmd = [sys.executable, "-m", "glassbox.cli", *launcher, "--config", self.config, "--run-dir",
               str(self.run_dir), "--steps", str(self.steps), "--nproc", str(world_size), "--resume", "auto",
               "--set", f"checkpoint.every={self.checkpoint_every}"]
        for override in self.overrides:
            cmd += ["--set", override]
        if self.adaptive:               # the world size is the scheduler's to choose, never the agent's
            for override in [*self.elastic_overrides, "resize=false"]:
                cmd += ["--elastic-set", override]
        return cmd


def _train_process_class():
    import ray

    @ray.remote
    class TrainProcess:
        """One run of one job, holding the Ray resources of its world size for as long as the actor lives."""

        def __init__(self) -> None:
            self.proc: subprocess.Popen | None = None

        def start(self, cmd: list[str], log_path: str) -> int:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            log = open(log_path, "ab")
            # A session of its own, so a stop reaches torchrun and every rank it spawned.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            log.close()
            return self.proc.pid

        def poll(self) -> int | None:
            return self.proc.poll()

        def stop(self, grace: float = 10.0) -> int:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            return self.proc.returncode

    return TrainProcess


@dataclass
class Run:
    world_size: int
    started: float
    actor: object
    ended: float | None = None


class RayExecutor:
    """Runs and resizes `JobRequest`s on a local Ray cluster of `slots` worker slots (a context manager)."""

    def __init__(self, slots: int, resource: str = "CPU"):
        if slots < 1:
            raise ExecutorError(f"a cluster needs at least one worker slot, got {slots}")
        self.slots = slots
        self.resource = resource
        self.jobs: dict[str, JobRequest] = {}
        self.runs: dict[str, list[Run]] = {}
        self.finished: dict[str, float] = {}
        self.t0 = time.monotonic()      # restarted once the cluster is up

    def __enter__(self) -> "RayExecutor":
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # a local, single-user cluster
        slots = {"num_cpus": self.slots} if self.resource == "CPU" else {"num_gpus": self.slots}
        # Ray gives its local node 30 s to come up, which a heavily loaded machine can miss: try again, then say so.
        for attempt in range(START_ATTEMPTS):
            try:
                ray.init(**slots, include_dashboard=False, log_to_driver=False, configure_logging=False)
                break
            except Exception as e:  # Ray raises a bare Exception for a node that timed out starting
                ray.shutdown()
                if attempt == START_ATTEMPTS - 1:
                    raise ExecutorError(f"the local Ray cluster did not start ({START_ATTEMPTS} attempts): {e}") from e
        self._cls = _train_process_class()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for name in list(self.runs):
            self._stop(name)
        ray.shutdown()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def submit(self, job: JobRequest) -> None:
        if job.name in self.jobs:
            raise ExecutorError(f"job {job.name!r} is already submitted")
        if job.replicas > self.slots:
            raise ExecutorError(f"job {job.name!r} asks for {job.replicas} workers but the cluster has {self.slots}")
        job.run_dir.mkdir(parents=True, exist_ok=True)
        self.jobs[job.name] = job
        self.runs[job.name] = []

    def world_size(self, name: str) -> int:
        runs = self.runs.get(name, [])
        return runs[-1].world_size if runs and runs[-1].ended is None else 0

    def log_path(self, name: str) -> Path:
        return self.jobs[name].run_dir / "executor.log"

    def _start(self, name: str, world_size: int) -> None:
        import ray

        options = {"num_cpus": world_size} if self.resource == "CPU" else {"num_cpus": 0, "num_gpus": world_size}
        actor = self._cls.options(**options).remote()
        ray.get(actor.start.remote(self.jobs[name].command(world_size), str(self.log_path(name))))
        self.runs[name].append(Run(world_size, self.now(), actor))

    def _stop(self, name: str) -> None:
        import ray

        runs = self.runs.get(name)
        if runs and runs[-1].ended is None:
            ray.get(runs[-1].actor.stop.remote())
            ray.kill(runs[-1].actor)
            runs[-1].ended = self.now()

    def apply(self, allocations: dict[str, int]) -> None:
        """Make each unfinished job run on exactly its allocated number of workers (0: stopped)."""
        unknown = set(allocations) - set(self.jobs)
        if unknown:
            raise ExecutorError(f"allocation for unknown job(s) {', '.join(sorted(unknown))}")
        total = sum(allocations.values())
        if total > self.slots:
            raise ExecutorError(f"allocations ask for {total} workers but the cluster has {self.slots}: "
                                f"{allocations}")
        changing = [n for n in self.jobs if n not in self.finished and allocations.get(n, 0) != self.world_size(n)]
        # Stop first, so the slots are free when the resized runs ask Ray for them.
        for name in changing:
            self._stop(name)
        for name in changing:
            if self._trained(name):
                self.finished[name] = self.now()
            elif allocations.get(name, 0) > 0:
                self._start(name, allocations[name])

    def _trained(self, name: str) -> bool:
        """Whether the job has committed the checkpoint of its last step: a run stopped after that (finishing up,
        or exited between a poll and this round) has nothing left to train, and restarting it would cost a
        process start and a checkpoint load to learn so (~25 s a job in the two-job test)."""
        from glassbox.checkpoints.index import CheckpointIndex

        steps = CheckpointIndex.of_run(self.jobs[name].run_dir).steps()
        return bool(steps) and steps[-1] >= self.jobs[name].steps

    def poll(self) -> dict[str, str]:
        """Each job's state: pending, running or finished; a run that failed raises, naming the job's log."""
        import ray

        states = {}
        for name, runs in self.runs.items():
            if name in self.finished:
                states[name] = "finished"
                continue
            if not runs or runs[-1].ended is not None:
                states[name] = "pending"
                continue
            rc = ray.get(runs[-1].actor.poll.remote())
            if rc is None:
                states[name] = "running"
                continue
            ray.kill(runs[-1].actor)
            runs[-1].ended = self.now()
            if rc != 0:
                tail = self.log_path(name).read_text(errors="replace").splitlines()[-15:]
                raise ExecutorError(f"job {name!r} failed (exit {rc}) at world size {runs[-1].world_size}; "
                                    f"{self.log_path(name)} ends:\n" + "\n".join(tail))
            self.finished[name] = self.now()
            states[name] = "finished"
        return states

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(self.poll()[n] != "finished" for n in names):
            if time.monotonic() > deadline:
                raise ExecutorError(f"jobs {names} did not finish within {timeout:.0f} s")
            time.sleep(0.5)

    def history(self) -> dict[str, list[dict]]:
        return {n: [{"world_size": r.world_size, "started": r.started, "ended": r.ended} for r in runs]
                for n, runs in self.runs.items()}


def observed_speedup(job: JobRequest, slots: int, fair: int):
    """A job's speedup table (goodput on r slots over goodput on its fair share) from its own run; None before it
    has stepped. An adaptive job's is its agent's latest report (its throughput model and gradient statistics,
    the batch range it may choose in): goodput, so a job whose noise scale has grown is worth more slots. A plain
    job's is the agent's throughput model fitted here to the step times in its metrics.jsonl (every world size
    it has run at), at its fixed batch: throughput alone."""
    import numpy as np

    from glassbox.elastic.sched.speedup import JobShape, goodput_table
    from glassbox.elastic.throughput import StepObservation, ThroughputParams, fit_throughput
    from glassbox.train.metrics_log import read_metrics

    metrics = read_metrics(job.run_dir)
    reports = [r for r in metrics if r.get("event") == "pollux" and r.get("throughput_params")]
    if reports:
        r = reports[-1]
        shape = JobShape(int(r["init_batch"]), int(r["max_batch"]), 1, int(r["max_micro_batch"]))
        return _relative_to_fair_share(goodput_table(ThroughputParams.from_dict(r["throughput_params"]),
                                                     float(r["grad_sqr"]), float(r["grad_var"]), shape, slots, 1),
                                       fair, slots)
    rows = [r for r in metrics if r.get("step_time") and r.get("world_size")]
    if not rows:
        return None
    seen: dict[tuple[int, int, int], list[float]] = {}
    for r in rows[1:] if len(rows) > 1 else rows:      # the first step of a run pays its warm-up
        world, micro, batch = int(r["world_size"]), int(r["micro_batch_size"]), int(r["batch_size"])
        micro = min(micro, batch // world)
        seen.setdefault((world, micro, batch // (world * micro)), []).append(float(r["step_time"]))
    params = fit_throughput([StepObservation(1, w, m, a, float(np.median(t))) for (w, m, a), t in seen.items()])
    batch = int(rows[-1]["batch_size"])
    return _relative_to_fair_share(goodput_table(params, 1.0, 0.0, JobShape(batch, batch, 1, batch), slots, 1),
                                   fair, slots)


def _relative_to_fair_share(table, fair: int, slots: int):
    """A goodput table over the job's goodput on its fair share (one node), or None where that is 0."""
    base = table[1, min(fair, slots)]
    return table / base if base > 0 else None


def schedule(executor: RayExecutor, jobs: list[JobRequest], policy, interval: float, timeout: float) -> dict:
    """Submit `jobs` at their arrival times and re-run `policy` every `interval` seconds until all finish."""
    import numpy as np

    from glassbox.elastic.sched.policy import JobView
    from glassbox.elastic.sched.workload import Cluster

    cluster = Cluster(1, executor.slots)
    pending = sorted(jobs, key=lambda j: j.arrival)
    arrival: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    rounds = []
    while True:
        now = executor.now()
        while pending and pending[0].arrival <= now:
            job = pending.pop(0)
            executor.submit(job)
            arrival[job.name] = now
        states = executor.poll()
        active = [n for n in arrival if states[n] != "finished"]
        if not pending and not active:
            break
        if time.monotonic() > deadline:
            raise ExecutorError(f"jobs still running after {timeout:.0f} s: {active}")
        if active:
            fair = max(1, -(-executor.slots // len(active)))
            views = []
            for name in active:
                job = executor.jobs[name]
                runs = executor.runs[name]
                attained = sum(r.world_size * ((r.ended or now) - r.started) for r in runs)
                view = JobView(name=name, arrival=arrival[name], age=now - arrival[name], attained_service=attained,
                               num_restarts=max(len(runs) - 1, 0), requested_replicas=job.replicas,
                               max_replicas=executor.slots)
                if getattr(policy, "adaptive", False):
                    table = observed_speedup(job, executor.slots, fair)
                    r = np.arange(executor.slots + 1, dtype=float)
                    view.speedup = table if table is not None else np.stack([0 * r, r / fair])
                views.append(view)
            current = {n: (executor.world_size(n),) for n in active if executor.world_size(n)}
            alloc = policy.allocate(now, views, cluster, current)
            executor.apply({n: int(sum(a)) for n, a in alloc.items()})
            rounds.append({"time": now, "allocations": {n: int(sum(a)) for n, a in alloc.items()}})
        time.sleep(interval)
    return {"rounds": rounds, "history": executor.history(), "finished": executor.finished}


def run_jobs_file(path: Path, gpus: int, interval: float, policy: str) -> dict:
    """`glassbox schedule run`: the jobs of a YAML file (a list of JobRequest fields) under a policy."""
    import yaml

    from glassbox.elastic.sched.cli import make_policy

    try:
        items = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExecutorError(f"{path}: cannot read the jobs file ({e})") from None
    if not isinstance(items, list) or not items:
        raise ExecutorError(f"{path}: expected a non-empty list of jobs")
    jobs = []
    for i, item in enumerate(items):
        try:
            item = dict(item)
            item["run_dir"] = Path(item["run_dir"])
            jobs.append(JobRequest(**item))
        except (TypeError, KeyError, ValueError) as e:
            raise ExecutorError(f"{path}: job {i} ({item.get('name', '?') if isinstance(item, dict) else item}): "
                                f"{e}") from None
    with RayExecutor(gpus) as executor:
        result = schedule(executor, jobs, make_policy(policy), interval, timeout=24 * 3600)
    print(json.dumps(result["history"], indent=1))
    return result
