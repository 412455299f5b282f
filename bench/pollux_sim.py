"""PolluxSched in the trace-driven simulator against Tiresias, Optimus+Oracle and FIFO, beside the Pollux OSDI'21
artifact's own results.

Replays the artifact's workloads (160 jobs on 16 nodes x 4 GPUs; workloads-0.5/-1.5/-2.0 are its job-load
variants) from its measured traces, under each policy, and writes per (load, workload, policy) the mean job
completion time, with the artifact's figure for the same cell (results-jobload/<policy>-<load>/summary.json; FIFO
was not in the artifact). The summary holds workload 6 at 1.0x load, the one the paper's testbed ran:
mean_jct per policy, reduction_vs_tiresias = 1 - pollux/tiresias, reduction_vs_optimus = 1 - pollux/optimus,
next to the artifact's and the issue's targets (32% and 48%).

Tiresias, Optimus and FIFO take a few seconds per workload; Pollux (a genetic algorithm every 60 s, at the
artifact's budget of 100 x 100 generations, and a throughput-model fit at every new step shape) a few
core-minutes at 1.0x load (146-261 s per workload on the 2-core box; 84-145 s at 64 x 40, which cost workload 6
0.6% in mean JCT), and more with the load: a cell's rounds and its jobs running at once both grow (workload 6 took
0.3x / 1x / 1.9x its 1.0x time at 0.5x / 1.0x / 1.5x). Cells run at once over --jobs processes, one core each.

    python bench/pollux_sim.py                                   # workload 6, 1.0x, four policies (~4 min, 2 cores)
    python bench/pollux_sim.py --loads 0.5 1.0 1.5 2.0           # job-load sensitivity on workload 6
    # the full sweep, 128 cells, on 16 cores in two parts (~4-7 and ~4-5 minutes, estimated from the 1.0x cells'
    # 70-125 core-seconds and the load scaling above; --resume joins them):
    python bench/pollux_sim.py --workloads 1 2 3 4 5 6 7 8 --loads 2.0 1.5 --jobs 16 --out bench/results/pollux_sim_cpu16
    python bench/pollux_sim.py --workloads 1 2 3 4 5 6 7 8 --loads 1.0 0.5 --jobs 16 --resume \
        --out bench/results/pollux_sim_cpu16 --llm-data /tmp/glassbox-llm-data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARTIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pollux-osdi21"
POLICIES = ("pollux", "tiresias", "optimus", "fifo")
LLM_VOCAB = 4096        # configs/tiny.yaml's vocabulary, for a corpus prepared by --llm-data


def workload_path(artifact: Path, load: float, number: int) -> Path:
    folder = "workloads" if load == 1.0 else f"workloads-{load:.1f}"
    return artifact / folder / f"workload-{number}.csv"


def artifact_mean(artifact: Path, policy: str, load: float, number: int) -> float | None:
    path = artifact / "results-jobload" / f"{policy}-{load:.1f}" / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["avgs"].get(f"workload-{number}")


def run_cell(cell: tuple[str, float, int, str, int, int, int]) -> dict:
    policy_name, load, number, artifact, population, generations, seed = cell
    import torch

    torch.set_num_threads(1)
    from glassbox.elastic.sched.cli import make_policy
    from glassbox.elastic.sched.simulator import simulate
    from glassbox.elastic.sched.traces import load_artifact_traces
    from glassbox.elastic.sched.workload import Cluster, read_workload

    artifact_dir = Path(artifact)
    path = workload_path(artifact_dir, load, number)
    traces = load_artifact_traces(artifact_dir / "traces")
    policy = make_policy(policy_name, population=population, generations=generations, seed=seed)
    t0 = time.perf_counter()
    result = simulate(read_workload(path), traces, policy, Cluster(16, 4), source=str(path))
    return {"policy": policy_name, "load": load, "workload": number, "mean_jct": result.mean_jct,
            "artifact_mean_jct": artifact_mean(artifact_dir, policy_name, load, number),
            "jobs": len(result.jct), "restarts": sum(result.restarts.values()),
            "simulated_hours": result.timeline[-1]["time"] / 3600 if result.timeline else 0.0,
            "wall_s": time.perf_counter() - t0}


def run_llm(args: argparse.Namespace, out_dir: Path) -> dict:
    """Measure a glassbox LLM's trace on this machine and replay LLM jobs arriving as workload 6's first jobs."""
    import math

    from glassbox.elastic.sched.cli import make_policy
    from glassbox.elastic.sched.llm_jobs import measure_llm_trace
    from glassbox.elastic.sched.simulator import simulate
    from glassbox.elastic.sched.traces import load_model_trace
    from glassbox.elastic.sched.workload import Cluster, JobSpec, read_workload

    if not (args.llm_data / "meta.json").is_file():      # a fresh machine: prepare the stdlib corpus there once
        from glassbox.data.prepare import prepare

        prepare(["stdlib"], args.llm_data, vocab_size=LLM_VOCAB, max_bytes=4_000_000, progress=False)
    t0 = time.perf_counter()
    trace_dir = measure_llm_trace(args.llm_config, args.llm_data, out_dir / "glassbox-llm", init_batch=16,
                                  max_batch=128, local_batches=(4, 8, 16, 32), world_sizes=(1, 2), steps=6,
                                  epochs=4, steps_per_epoch=5, samples_per_epoch=args.llm_samples_per_epoch)
    measure_s = time.perf_counter() - t0
    trace = load_model_trace(trace_dir)
    base = read_workload(workload_path(args.artifact, 1.0, 6))[: args.llm_jobs]
    jobs = []
    for i, spec in enumerate(base):
        replicas = min(max(spec.num_replicas, 1), 8)
        jobs.append(JobSpec(f"llm-{i}", spec.arrival, "glassbox-llm", replicas,
                            min(max(16, 2 ** math.ceil(math.log2(4 * replicas))), 128)))
    mean_jct = {}
    for name in POLICIES:
        policy = make_policy(name, population=args.population, generations=args.generations, seed=args.seed)
        mean_jct[name] = simulate(jobs, {"glassbox-llm": trace}, policy, Cluster(16, 4)).mean_jct
    provenance = json.loads((trace_dir / "provenance.json").read_text())
    return {"config": args.llm_config, "jobs": len(jobs), "samples_per_epoch": args.llm_samples_per_epoch,
            "measure_s": measure_s, "measurements": provenance["measurements"],
            "throughput_params": provenance["throughput_params"],
            "noise_scale_by_epoch": [float(trace.curves[16].grad_var[e] * 16 / trace.curves[16].grad_sqr[e])
                                     for e in range(trace.max_epochs)],
            "mean_jct": mean_jct, "reduction_vs_tiresias": reduction(mean_jct["pollux"], mean_jct["tiresias"]),
            "reduction_vs_optimus": reduction(mean_jct["pollux"], mean_jct["optimus"])}


def reduction(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 1.0 - a / b


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r["load"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, policy in enumerate(POLICIES):
        ours = [[r["mean_jct"] for r in rows if r["policy"] == policy and r["load"] == ld] for ld in loads]
        theirs = [[r["artifact_mean_jct"] for r in rows if r["policy"] == policy and r["load"] == ld
                   and r["artifact_mean_jct"] is not None] for ld in loads]
        xs = [ld for ld, v in zip(loads, ours) if v]
        if xs:
            ax.plot(xs, [sum(v) / len(v) / 3600 for v in ours if v], marker="o", color=f"C{i}", label=policy)
        xs = [ld for ld, v in zip(loads, theirs) if v]
        if xs:
            ax.plot(xs, [sum(v) / len(v) / 3600 for v in theirs if v], ls="--", marker="x", color=f"C{i}",
                    label=f"{policy} (artifact)")
    ax.set_xlabel("relative job load")
    ax.set_ylabel("mean JCT (hours, log scale)")
    ax.set_yscale("log")
    ax.set_title("Pollux simulator: ours (solid) vs the OSDI'21 artifact (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)              # the plot is redrawn after every finished cell


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=ARTIFACT, help="the Pollux artifact's data directory")
    ap.add_argument("--workloads", type=int, nargs="+", default=[6])
    ap.add_argument("--loads", type=float, nargs="+", default=[1.0])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--jobs", "--workers", dest="workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="cells simulated at once, one process each (a process pool)")
    # The artifact's NSGA-II budget (adaptdl_sched's PolluxPolicy: population 100, 100 generations per round).
    ap.add_argument("--population", type=int, default=100, help="Pollux GA population")
    ap.add_argument("--generations", type=int, default=100, help="Pollux GA generations per 60 s round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "pollux_sim")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out's JSON (same settings)")
    ap.add_argument("--redo", nargs="*", default=[], choices=POLICIES, help="with --resume: recompute these")
    ap.add_argument("--llm-data", type=Path, help="DATA_DIR (prepared there from the stdlib corpus when it holds "
                    "none): also measure a glassbox LLM and replay LLM jobs")
    ap.add_argument("--llm-config", default="tiny", help="run config of the LLM job type")
    ap.add_argument("--llm-jobs", type=int, default=40)
    ap.add_argument("--llm-samples-per-epoch", type=int, default=50_000,
                    help="samples a simulated LLM job trains per measured epoch (4 epochs)")
    args = ap.parse_args()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")        # one core per cell: --jobs processes, not --jobs x threads

    settings = {"cluster": "16 nodes x 4 GPUs", "interval_s": 60, "restart_delay_s": 30,
                "ga_population": args.population, "ga_generations": args.generations, "seed": args.seed}
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "platform": platform.platform(), "workers": args.workers}
    rows: list[dict] = []
    extra: dict = {}
    json_path = args.out.with_suffix(".json")
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("settings") == settings and previous.get("machine", {}).get("host") == machine["host"]:
            rows = [r for r in previous["cells"] if r["policy"] not in args.redo]
            extra = {"llm": previous["llm"]} if "llm" in previous else {}
    if args.llm_data:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pollux-llm-") as tmp:
            extra["llm"] = run_llm(args, Path(tmp))
        print("LLM jobs:", json.dumps(extra["llm"]["mean_jct"]), flush=True)
    done = {(r["policy"], r["load"], r["workload"]) for r in rows}
    cells = [(p, ld, w, str(args.artifact), args.population, args.generations, args.seed)
             for ld in args.loads for w in args.workloads for p in args.policies if (p, ld, w) not in done]
    # The summary's cells (workload 6 at 1.0x) first, then the slow Pollux cells, heaviest load first (a cell's
    # cost grows with the jobs it has running at once), so the longest cells do not start last and set the
    # sweep's end; every finished cell is written out at once, so an interrupted sweep keeps what it has
    # (--resume continues it, redoing only the cells that had not finished).
    cells.sort(key=lambda c: (not (c[1] == 1.0 and c[2] == 6), c[0] != "pollux", -c[1], c[2]))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_cell, c) for c in cells]
        for future in as_completed(futures):
            r = future.result()
            rows.append(r)
            print(f"{r['policy']:>8} load {r['load']:.1f} workload {r['workload']}: mean JCT {r['mean_jct']:8.1f} s "
                  f"(artifact {r['artifact_mean_jct'] or float('nan'):8.1f}), {r['wall_s']:.0f} s wall", flush=True)
            summary = write_results(args.out, rows, machine, settings, time.perf_counter() - t0, extra)
    if not cells:
        summary = write_results(args.out, rows, machine, settings, 0.0, extra)
    print(json.dumps(summary, indent=1))
    return 0


def write_results(path: Path, rows: list[dict], machine: dict, settings: dict, wall_s: float,
                  extra: dict) -> dict:
    """The JSON, markdown and plot of the cells so far; returns the summary."""
    rows.sort(key=lambda r: (r["load"], r["workload"], POLICIES.index(r["policy"])))

    def cell(policy: str, load: float = 1.0, number: int = 6, key: str = "mean_jct") -> float | None:
        return next((r[key] for r in rows if r["policy"] == policy and r["load"] == load and r["workload"] == number),
                    None)

    mean_jct = {p: cell(p) for p in POLICIES if cell(p) is not None}
    artifact_jct = {p: cell(p, key="artifact_mean_jct") for p in POLICIES if cell(p, key="artifact_mean_jct")}
    summary = {
        "workload": 6, "load": 1.0, "mean_jct": mean_jct,
        "reduction_vs_tiresias": reduction(mean_jct.get("pollux"), mean_jct.get("tiresias")),
        "reduction_vs_optimus": reduction(mean_jct.get("pollux"), mean_jct.get("optimus")),
        "artifact_mean_jct": artifact_jct,
        "artifact_reduction_vs_tiresias": reduction(artifact_jct.get("pollux"), artifact_jct.get("tiresias")),
        "artifact_reduction_vs_optimus": reduction(artifact_jct.get("pollux"), artifact_jct.get("optimus")),
        "target_reduction_vs_tiresias": 0.32, "target_reduction_vs_optimus": 0.48,
    }

    def over_workloads(policy: str, load: float, key: str) -> float | None:
        values = [r[key] for r in rows if r["policy"] == policy and r["load"] == load and r[key] is not None]
        return sum(values) / len(values) if values else None

    load_rows = []
    for load in sorted({r["load"] for r in rows}):
        ours = {p: over_workloads(p, load, "mean_jct") for p in ("pollux", "tiresias", "optimus")}
        theirs = {p: over_workloads(p, load, "artifact_mean_jct") for p in ("pollux", "tiresias", "optimus")}
        if ours["pollux"] is not None:
            load_rows.append({"load": load, "workloads": sorted({r["workload"] for r in rows if r["load"] == load}),
                              "mean_jct": ours, "artifact_mean_jct": theirs,
                              "reduction_vs_tiresias": reduction(ours["pollux"], ours["tiresias"]),
                              "reduction_vs_optimus": reduction(ours["pollux"], ours["optimus"]),
                              "artifact_reduction_vs_tiresias": reduction(theirs["pollux"], theirs["tiresias"]),
                              "artifact_reduction_vs_optimus": reduction(theirs["pollux"], theirs["optimus"])})
    summary["job_load"] = load_rows
    out = {"summary": summary, "machine": machine, "cells": rows, "settings": settings, "wall_s": wall_s, **extra}
    from glassbox.atomic import write_json, write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path.with_suffix(".json"), out)
    write_text(path.with_suffix(".md"), markdown(out))
    write_plot(rows, path.with_suffix(".png"))
    return summary


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def markdown(out: dict) -> str:
    s, m = out["summary"], out["machine"]
    lines = [f"# Pollux cluster simulator (host {m['host']}, {m['cpus']} CPUs, {m['workers']} workers)", "",
             "Mean job completion time (s) per policy on the artifact's workloads, 16 nodes x 4 GPUs, beside the "
             "artifact's own results (results-jobload/*/summary.json). Ours and the artifact's are separate "
             f"simulators over the same traces; GA population {out['settings']['ga_population']}, "
             f"{out['settings']['ga_generations']} generations per 60 s round.", "",
             "## Workload 6, 1.0x load (the paper's testbed workload)", "",
             "| policy | ours | artifact |", "|---|---:|---:|"]
    for p in POLICIES:
        if p in s["mean_jct"]:
            lines.append(f"| {p} | {sec(s['mean_jct'][p])} | {sec(s['artifact_mean_jct'].get(p))} |")
    lines += ["", "| reduction by Pollux | ours | artifact | issue target |", "|---|---:|---:|---:|",
              f"| vs Tiresias | {pct(s['reduction_vs_tiresias'])} | {pct(s['artifact_reduction_vs_tiresias'])} "
              f"| 32% |",
              f"| vs Optimus | {pct(s['reduction_vs_optimus'])} | {pct(s['artifact_reduction_vs_optimus'])} | 48% |",
              ""]
    if s["job_load"]:
        lines += ["## Job-load sensitivity (mean JCT over the workloads run at each load)", "",
                  "| load | workloads | Pollux JCT (ours / artifact) | vs Tiresias (ours) | vs Tiresias (artifact) | "
                  "vs Optimus (ours) | vs Optimus (artifact) |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in s["job_load"]:
            lines.append(f"| {r['load']:.1f}x | {','.join(map(str, r['workloads']))} | "
                         f"{sec(r['mean_jct']['pollux'])} / {sec(r['artifact_mean_jct']['pollux'])} | "
                         f"{pct(r['reduction_vs_tiresias'])} | "
                         f"{pct(r['artifact_reduction_vs_tiresias'])} | {pct(r['reduction_vs_optimus'])} | "
                         f"{pct(r['artifact_reduction_vs_optimus'])} |")
        lines.append("")
    if "llm" in out:
        llm = out["llm"]
        lines += [f"## LLM jobs: glassbox `{llm['config']}` measured on this machine", "",
                  f"{llm['jobs']} jobs arriving as workload 6's first {llm['jobs']}, each 4 epochs of "
                  f"{llm['samples_per_epoch']:,} samples; step times from real runs at 1 and 2 ranks (local batches "
                  f"{sorted({m['local_batch'] for m in llm['measurements']})}), noise scale per epoch "
                  f"{', '.join(f'{x:.0f}' for x in llm['noise_scale_by_epoch'])} samples (measured in "
                  f"{llm['measure_s']:.0f} s).", "", "| policy | mean JCT (s) |", "|---|---:|"]
        lines += [f"| {p} | {sec(v)} |" for p, v in llm["mean_jct"].items()]
        lines += ["", f"Pollux vs Tiresias {pct(llm['reduction_vs_tiresias'])}, vs Optimus "
                      f"{pct(llm['reduction_vs_optimus'])}.", ""]
    lines += ["## Every cell", "", "| load | workload | policy | ours (s) | artifact (s) | restarts | wall (s) |",
              "|---:|---:|---|---:|---:|---:|---:|"]
    for r in out["cells"]:
        lines.append(f"| {r['load']:.1f} | {r['workload']} | {r['policy']} | {sec(r['mean_jct'])} | "
                     f"{sec(r['artifact_mean_jct'])} | {r['restarts']} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
