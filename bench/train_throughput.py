"""Training throughput (tokens/s) and MFU of the bundled configs that fit the machine, through the real trainer.

Each case is a fresh `torchrun -m glassbox.train` process group training a bundled config on the stdlib corpus
(prepared once into --data), with checkpoints, wandb and the progress bar off; tokens/s and MFU come from the
run's own metrics.jsonl (the numbers a user sees), as the median over the steps after the warmup steps.

MFU = FLOPs per token x tokens/s / (peak per device x devices), FLOPs per token = 6 x non-embedding (active)
parameters + 12 x layers x hidden x sequence (ModelConfig.flops_per_token). On a CPU the peak is this machine's
measured fp32 matmul rate (glassbox.train.flops), so CPU MFU reads "fraction of the best a big matmul gets here".

On a CPU the cases are tiny, moe-tiny and small (one process on all cores), tiny in one process of one thread,
and tiny with FSDP2 and with DDP over 2 gloo ranks of one thread each; 1b and amber-7b need GPUs (their fp32
weights and Adam state alone take 18 and 108 GB). On a GPU every config whose state fits the card runs.

    python bench/train_throughput.py                  # prepares demo-sized data into the temp dir if needed
    python bench/train_throughput.py --data DIR --configs tiny,moe-tiny

Writes bench/results/train_throughput.json (rows) and bench/results/train_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CORPUS_BYTES = 4_000_000

# (config, processes, data parallel, threads per process (0: cores / processes), steps, warmup steps, overrides)
# per case; batches cut so a CPU step is short.
CPU_CASES = [
    ("tiny", 1, "none", 0, 30, 5, []),
    ("tiny", 1, "none", 1, 30, 5, []),
    ("moe-tiny", 1, "none", 0, 30, 5, []),
    ("small", 1, "none", 0, 3, 1, ["batch.global_batch_size=2", "batch.micro_batch_size=2"]),
    ("tiny", 2, "fsdp", 1, 30, 5, []),
    ("tiny", 2, "ddp", 1, 30, 5, []),
]
GPU_CASES = [
    ("tiny", 1, "none", 4, 50, 10, []),
    ("moe-tiny", 1, "none", 4, 50, 10, []),
    ("small", 1, "none", 4, 30, 5, ["batch.global_batch_size=32", "batch.micro_batch_size=32"]),
    ("1b", 1, "none", 4, 20, 5, ["batch.global_batch_size=8", "batch.micro_batch_size=4"]),
    ("amber-7b", 1, "none", 4, 10, 3, ["batch.global_batch_size=1", "batch.micro_batch_size=1"]),
]


def state_bytes(config: str) -> float:
    """fp32 weights + grads + two Adam moments: 16 bytes per parameter."""
    from glassbox.train.config import load_run_config

    return 16 * load_run_config(ROOT / "configs" / f"{config}.yaml").model.num_params()


def prepare_data(path: Path) -> Path:
    from glassbox.data.prepare import prepare

    if not (path / "meta.json").exists():
        prepare(["stdlib"], path, vocab_size=4096, max_bytes=CORPUS_BYTES)
    return path


def run_case(config: str, nproc: int, dp: str, steps: int, extra: list[str], data: Path, threads: int,
             peak: float) -> list[dict]:
    """One torchrun of the case; its metrics rows."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "glassbox.train", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--data", str(data),
               "--run-dir", str(run_dir), "--steps", str(steps),
               "--set", "schedule.warmup_steps=1", "--set", "checkpoint.save_final=false",
               "--set", "logging.wandb.mode=disabled", "--set", "logging.progress=false",
               "--set", f"logging.val_every={steps + 1}", "--set", "logging.val_samples=2",
               "--set", f"logging.peak_flops={peak}"]
        if dp != "none":
            cmd += ["--set", f"parallel.data_parallel={dp}"]
        for override in extra:
            cmd += ["--set", override]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{config} x{nproc} {dp} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(config: str, nproc: int, dp: str, extra: list[str], threads: int, runs: list[list[dict]],
              warmup: int) -> dict:
    from glassbox.train.config import load_run_config

    cfg = load_run_config(ROOT / "configs" / f"{config}.yaml", extra)
    timed = [r for rows in runs for r in rows[warmup:]]
    return {
        "config": config,
        "layout": "single" if dp == "none" else f"{dp} x{nproc}",
        "processes": nproc,
        "threads_per_process": threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "params": cfg.model.num_params(),
        "flops_per_token": cfg.model.flops_per_token(cfg.data.seq_len),
        "global_batch": cfg.batch.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "rounds": len(runs),
        "steps_timed": len(timed),
        "median_step_s": statistics.median(r["step_time"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "first_loss": runs[0][0]["loss"],
        "last_loss": runs[0][-1]["loss"],
    }


def markdown(rows: list[dict], note: str) -> str:
    base = {}
    for r in rows:
        base.setdefault(r["config"], r["tokens_per_s"])
    lines = [
        "# Training throughput (glassbox trainer, bundled configs)", "", note, "",
        "| config | layout | procs x threads | params | batch x seq | median step (s) | tokens/s | "
        "vs first | MFU | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["config"]] if r["config"] in base else float("nan")
        lines.append(
            f"| {r['config']} | {r['layout']} | {r['processes']} x {r['threads_per_process']} | "
            f"{r['params'] / 1e6:.1f}M | {r['global_batch']} x {r['seq_len']} | {r['median_step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {ratio:.2f} | {r['mfu'] * 100:.1f}% | "
            f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "glassbox-bench-stdlib-4096")
    parser.add_argument("--configs", help="comma-separated subset of the cases' configs")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every case")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    args = parser.parse_args()
    from glassbox.train.flops import measured_cpu_peak, peak_flops

    data = prepare_data(args.data)
    gpu = torch.cuda.is_available()
    cases = GPU_CASES if gpu else CPU_CASES
    wanted = set(args.configs.split(",")) if args.configs else None
    cores = os.cpu_count() or 1
    budget = (torch.cuda.get_device_properties(0).total_memory if gpu
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) * 0.6
    cases = [c for c in cases if (not wanted or c[0] in wanted)]
    for case in list(cases):
        if state_bytes(case[0]) > budget:
            print(f"skip {case[0]}: its training state does not fit this machine", flush=True)
            cases.remove(case)
    if gpu:
        peak = peak_flops(torch.device("cuda", 0), bf16=True)
    else:
        torch.set_num_threads(cores)
        peak = measured_cpu_peak()
    # Rounds interleave the cases (A B C, A B C, ...) so that load from other processes on a shared machine
    # falls on every case alike; each row is the median over all its rounds' timed steps.
    runs: dict[int, list[list[dict]]] = {i: [] for i in range(len(cases))}
    for round_ in range(args.rounds):
        for i, (config, nproc, dp, threads, steps, warmup, extra) in enumerate(cases):
            threads = threads or max(1, cores // nproc)
            # A CPU process owns `threads` of the cores the peak was measured on.
            case_peak = peak if gpu else peak * threads / cores
            runs[i].append(run_case(config, nproc, dp, steps, extra, data, threads, case_peak))
            print(f"round {round_ + 1}: {config} {dp} x{nproc}, {threads} threads each, done", flush=True)
    rows = []
    for i, (config, nproc, dp, threads, steps, warmup, extra) in enumerate(cases):
        rows.append(summarize(config, nproc, dp, extra, threads or max(1, cores // nproc), runs[i], warmup))
    hardware = torch.cuda.get_device_name(0) if gpu else f"CPU, {cores} cores"
    note = (f"Measured on {hardware}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Medians over the "
            f"timed steps of {args.rounds} interleaved rounds; 'vs first' is tokens/s over the config's first row "
            f"(one process on all cores). MFU against a peak of {peak / 1e9:,.0f} GFLOP/s"
            + (" (datasheet bf16)." if gpu else " (this CPU's measured fp32 matmul rate on all its cores; a process "
               "of T threads is measured against T / cores of it). A shared machine makes CPU numbers noisy."))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from glassbox.atomic import write_json, write_text

    write_json(args.out, {"hardware": hardware, "torch": torch.__version__, "peak_flops": peak, "rows": rows})
    write_text(args.out.with_suffix(".md"), markdown(rows, note))
    print(markdown(rows, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
