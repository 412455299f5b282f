"""`glassbox schedule ...`: the cluster scheduler's commands.

  glassbox schedule simulate --workload W.csv --traces DIR --policy pollux    replay a workload in the simulator
  glassbox schedule measure --config tiny --data DIR --out traces/llm        an LLM job type from real runs
  glassbox schedule run --jobs JOBS.yaml --gpus N                            real glassbox jobs on a Ray cluster
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glassbox.errors import GlassboxError

POLICY_NAMES = ("pollux", "tiresias", "optimus", "fifo")


def make_policy(name: str, population: int = 64, generations: int = 40, seed: int = 0):
    """A policy by name; the GA settings apply to Pollux only."""
    from glassbox.elastic.sched.fifo import FifoPolicy
    from glassbox.elastic.sched.optimus import OptimusPolicy
    from glassbox.elastic.sched.pollux import PolluxPolicy
    from glassbox.elastic.sched.tiresias import TiresiasPolicy

    if name == "pollux":
        return PolluxPolicy(population=population, generations=generations, seed=seed)
    policies = {"tiresias": TiresiasPolicy, "optimus": OptimusPolicy, "fifo": FifoPolicy}
    if name not in policies:
        raise GlassboxError(f"unknown policy {name!r} (one of {', '.join(POLICY_NAMES)})")
    return policies[name]()


def simulate_cmd(args: argparse.Namespace) -> int:
    from glassbox.atomic import write_json
    from glassbox.elastic.sched.simulator import simulate
    from glassbox.elastic.sched.traces import load_artifact_traces, load_model_trace
    from glassbox.elastic.sched.workload import Cluster, read_workload

    traces = load_artifact_traces(args.traces)
    for extra in args.trace:
        trace = load_model_trace(extra)
        traces[trace.name] = trace
    jobs = read_workload(args.workload)
    policy = make_policy(args.policy, args.population, args.generations, args.seed)
    result = simulate(jobs, traces, policy, Cluster(args.nodes, args.gpus_per_node), interval=args.interval,
                      restart_delay=args.restart_delay, source=str(args.workload))
    print(f"{args.policy}: {len(result.jct)} jobs, mean JCT {result.mean_jct:.1f} s, "
          f"{sum(result.restarts.values())} restarts")
    if args.out:
        write_json(args.out, {"policy": args.policy, "workload": str(args.workload), "mean_jct": result.mean_jct,
                              "jct": result.jct, "restarts": result.restarts, "timeline": result.timeline})
    return 0


def measure_cmd(args: argparse.Namespace) -> int:
    from glassbox.elastic.sched.llm_jobs import measure_llm_trace

    out = measure_llm_trace(args.config, args.data, args.out, init_batch=args.init_batch, max_batch=args.max_batch,
                            local_batches=tuple(args.local_batches), world_sizes=tuple(args.world_sizes),
                            steps=args.steps, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                            overrides=tuple(args.overrides))
    print(f"wrote the trace of {args.config} to {out}")
    return 0


def run_cmd(args: argparse.Namespace) -> int:
    from glassbox.elastic.sched.executor import run_jobs_file

    run_jobs_file(args.jobs, gpus=args.gpus, interval=args.interval, policy=args.policy)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="cluster scheduling: simulate policies on traces, or run jobs on Ray")
    s = p.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND")

    sim = s.add_parser("simulate", help="replay a workload CSV under a policy in the trace-driven simulator")
    sim.add_argument("--workload", type=Path, required=True, help="CSV: name,time,application,num_replicas,"
                                                                   "batch_size")
    sim.add_argument("--traces", type=Path, required=True,
                     help="the artifact's traces/ directory (bert cifar10 deepspeech2 imagenet ncf yolov3)")
    sim.add_argument("--trace", type=Path, action="append", default=[],
                     help="an extra model trace directory (e.g. from `glassbox schedule measure`), repeatable")
    sim.add_argument("--policy", choices=POLICY_NAMES, default="pollux")
    sim.add_argument("--nodes", type=int, default=16)
    sim.add_argument("--gpus-per-node", type=int, default=4)
    sim.add_argument("--interval", type=float, default=60.0, help="seconds between scheduling rounds")
    sim.add_argument("--restart-delay", type=float, default=30.0, help="seconds a reallocated job pauses")
    sim.add_argument("--population", type=int, default=64)
    sim.add_argument("--generations", type=int, default=40)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", type=Path, help="write the per-job completion times as JSON")
    sim.set_defaults(handler=simulate_cmd)

    mea = s.add_parser("measure", help="measure a glassbox model's throughput and noise scale into a trace")
    mea.add_argument("--config", required=True, help="run config (path or bundled name)")
    mea.add_argument("--data", type=Path, required=True, help="prepared DATA_DIR")
    mea.add_argument("--out", type=Path, required=True, help="trace directory to write (the model's name)")
    mea.add_argument("--init-batch", type=int, default=8)
    mea.add_argument("--max-batch", type=int, default=64)
    mea.add_argument("--local-batches", type=int, nargs="+", default=[2, 4, 8, 16])
    mea.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    mea.add_argument("--steps", type=int, default=8, help="steps per throughput run")
    mea.add_argument("--epochs", type=int, default=4)
    mea.add_argument("--steps-per-epoch", type=int, default=5)
    mea.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config override for every run (e.g. parallel.device=cuda)")
    mea.set_defaults(handler=measure_cmd)

    run = s.add_parser("run", help="run real glassbox training jobs on a local Ray cluster, resized by a policy")
    run.add_argument("--jobs", type=Path, required=True, help="YAML list of jobs (see docs/elastic_scheduling.md)")
    run.add_argument("--gpus", type=int, default=2, help="worker slots in the cluster (CPU processes here)")
    run.add_argument("--interval", type=float, default=20.0, help="seconds between scheduling rounds")
    run.add_argument("--policy", choices=POLICY_NAMES, default="pollux")
    run.set_defaults(handler=run_cmd)
    p.set_defaults(handler=lambda args: p.print_help())
