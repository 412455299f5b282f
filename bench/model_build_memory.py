"""Peak host memory of building the model to train: the eager build against the meta-device build, per rank.

- eager ("before"): `Transformer(cfg)` at full size on the host, then `parallelize` (FSDP2 over the ranks), as
  the trainer built it: every rank holds the whole fp32 model before sharding it.
- meta ("after"): `glassbox.train.model_init.build_model`: built on the meta device, parallelized, and each rank
  gives storage to and fills only its own shards, one full tensor at a time.

A case is a build and a rank count (`meta-2`: the meta build on 2 gloo ranks under FSDP2, spawned). Each case
runs in a fresh process (its ranks fresh spawned processes), on CPU, and reports each rank's peak resident set
size (`ru_maxrss`, which includes the ~0.5 GiB of the Python and torch import), its RSS before the build, the
bytes of parameters it holds after it, and the build's seconds; the table takes the largest rank's figures.

    python bench/model_build_memory.py         # configs/amber-7b.yaml, 4 cases: needs ~27 GiB per eager rank
    python bench/model_build_memory.py --model-config configs/1b.yaml --cases meta-1,meta-2 --out /tmp/m.json
    python bench/model_build_memory.py --set model.num_layers=2 --out /tmp/m.json     # a quick check

Writes bench/results/model_build_memory.json (a top-level `summary` of the peaks in GiB and the machine, and
one row per case) and model_build_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GIB = 2**30


def model_config(args):
    from glassbox.train.config import load_run_config

    run = load_run_config(args.model_config, args.set)
    return run.model, run.seed


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_on_rank(rank: int, ranks: int, build: str, args, out_dir: str) -> None:
    """Join the group (when several ranks), build the model one way, and write this rank's figures."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from glassbox.models.transformer import Transformer
    from glassbox.train.config import ParallelConfig
    from glassbox.train.model_init import build_model
    from glassbox.train.parallel import init_world, parallelize

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    if ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank),
                          WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=ranks)
    cfg, seed = model_config(args)
    parallel = ParallelConfig(device="cpu", data_parallel="fsdp")
    world = init_world(parallel)
    before = rss_bytes()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if build == "eager":
        model = parallelize(Transformer(cfg), parallel, world, bf16=False)
    else:
        model = build_model(cfg, parallel, world, bf16=False)
    seconds = time.perf_counter() - t0
    held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB
    row = {"rank": rank, "peak_rss_bytes": peak, "rss_before_build_bytes": before, "param_bytes_held": held,
           "build_s": seconds}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    if ranks > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_worker(args) -> None:
    """One case in this fresh process: build here (one rank) or on fresh spawned ranks; print its row."""
    import torch.multiprocessing as mp

    build, ranks = parse_case(args.worker)
    with tempfile.TemporaryDirectory() as out_dir:
        if ranks == 1:
            build_on_rank(0, 1, build, args, out_dir)
        else:
            mp.spawn(build_on_rank, args=(ranks, build, args, out_dir), nprocs=ranks, join=True)
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(ranks)]
    cfg, _ = model_config(args)
    print("ROW " + json.dumps({"case": args.worker, "build": build, "ranks": ranks, "params": cfg.num_params(),
                               "per_rank": per_rank}), flush=True)


def parse_case(case: str) -> tuple[str, int]:
    build, _, ranks = case.partition("-")
    if build not in ("eager", "meta") or not ranks.isdigit() or int(ranks) < 1:
        raise SystemExit(f"case {case!r}: expected eager-N or meta-N (N ranks), e.g. meta-2")
    return build, int(ranks)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(memory / GIB, 1)}


def markdown(result: dict) -> str:
    s = result["summary"]
    m = s["machine"]
    lines = [
        "# Model build: peak host memory per rank",
        "",
        f"Model: {s['model_config']}{' with ' + ', '.join(s['overrides']) if s['overrides'] else ''} "
        f"({s['params'] / 1e9:.2f}B parameters, {s['params'] * 4 / GIB:.1f} GiB in fp32). Machine: {m['host']}, "
        f"{m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB. Peak RSS (`ru_maxrss`) of the largest rank, each "
        "case in a fresh process; it includes the Python and torch import (the RSS before the build). eager: "
        "`Transformer(cfg)` then `parallelize`; meta: `build_model` (meta device, parallelize, fill own shards).",
        "",
        "| build | ranks | peak RSS / rank (GiB) | RSS before build (GiB) | parameters held / rank (GiB) | build (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        top = max(r["per_rank"], key=lambda x: x["peak_rss_bytes"])
        lines.append(f"| {r['build']} | {r['ranks']} | {top['peak_rss_bytes'] / GIB:.2f} | "
                     f"{top['rss_before_build_bytes'] / GIB:.2f} | {top['param_bytes_held'] / GIB:.2f} | "
                     f"{max(x['build_s'] for x in r['per_rank']):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-config", default=str(ROOT / "configs" / "amber-7b.yaml"),
                   help="a run config YAML; its `model:` section (and `seed`) is built")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. model.num_layers=2 (repeatable)")
    p.add_argument("--cases", default="eager-1,meta-1,eager-2,meta-2",
                   help="comma-separated eager-N / meta-N: the build on N CPU ranks (FSDP2 when N > 1)")
    p.add_argument("--out", type=Path, default=RESULTS / "model_build_memory.json")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one case may take")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29533, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    cases = args.cases.split(",")
    for case in cases:
        parse_case(case)
    cfg, _ = model_config(args)
    rows = []
    for i, case in enumerate(cases):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--model-config", args.model_config,
               "--port", str(args.port + i)] + [f"--set={s}" for s in args.set]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            print(f"[{case}] FAILED rc={proc.returncode}\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]),
                  flush=True)
            continue
        peak = max(r["peak_rss_bytes"] for r in found[0]["per_rank"])
        print(f"[{case}] peak RSS {peak / GIB:.2f} GiB per rank, {time.perf_counter() - t0:.0f}s", flush=True)
        rows.append(found[0])
    result = {
        "summary": {
            "machine": machine(), "model_config": args.model_config, "overrides": args.set,
            "params": cfg.num_params(),
            "peak_rss_gib_per_rank": {r["case"]: round(max(x["peak_rss_bytes"] for x in r["per_rank"]) / GIB, 2)
                                      for r in rows},
        },
        "rows": rows,
    }
    from glassbox.atomic import write_json, write_text

    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
