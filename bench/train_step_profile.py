"""Where a small model's training step goes: the device's busy time per step beside the step's time, by shape.

Pollux's adaptive run loses to the best fixed batch on one H200 (bench/results/pollux_adaptive.md) in places a
throughput model cannot see: a pass of 16 or 32 samples of the ~95M-parameter bench model costs about what a
pass of 64 does (~60 ms), so a split step costs a whole extra step, and the adaptive run's whole steps of 64 took
~66 ms against the fixed run's ~61. This says which of host and device sets those times, through the real
trainer on the Pollux bench's model and data:

- per shape (batch, micro-batch): the median step time, the host's time per step, and the device's kernel time
  per step, from torch.profiler over steps in the steady state, with the host's most expensive operators;
- the fixed batch-64 run, then the Pollux run of bench/pollux_adaptive.py (same agent, fewer samples), then the
  fixed run again: the median of each run's whole (unsplit, unvalidated) steps of 64, so an order effect (a run
  first after the warm-up) shows apart from the agent's.

    python bench/train_step_profile.py --device cuda --data build/gpu-data/pollux-small --out-name NAME [--compile]

Writes bench/results/NAME.{json,md}; the summary holds pass_ms (median step of one pass, by micro-batch),
device_busy (kernel time over step time, by shape) and whole_step_ms_64 (fixed, pollux, fixed again).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pollux_adaptive as bench  # noqa: E402  (the Pollux bench's model, data, runs and agent)

from glassbox import atomic  # noqa: E402
from glassbox.train.callbacks import Callback  # noqa: E402

SHAPES = [(16, 16), (32, 32), (32, 16), (64, 64), (64, 32), (128, 128)]
TOP_OPS = 12


class ProfileSteps(Callback):
    """torch.profiler over steps [first, last], and the host's wall time between their ends."""

    def __init__(self, first: int, last: int, device: str):
        self.first, self.last = first, last
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.python = cProfile.Profile()
        self.ends: list[float] = []
        self.events = None

    def on_step_end(self, state) -> None:
        if state.step == self.first - 1:
            self.profiler.start()
            self.python.enable()
            self.ends.append(time.perf_counter())
        elif self.first <= state.step <= self.last:
            self.ends.append(time.perf_counter())
            if state.step == self.last:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.python.disable()
                self.profiler.stop()
                self.events = self.profiler.key_averages()


def kernel_us(event) -> float:
    """The device time of a kernel's (or memcpy's) profiler row; 0 for a host operator's row, whose
    self_device_time_total repeats the time of the kernels it launched, which have rows of their own."""
    if event.device_type != torch.autograd.DeviceType.CUDA:
        return 0.0
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def profile_shape(args, batch: int, micro: int) -> dict[str, Any]:
    from glassbox.train.metrics_log import read_metrics
    from glassbox.train.trainer import Trainer

    steps, first, last = args.steps, args.steps - 14, args.steps - 5
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench.run_config(args, Path(tmp) / "run", batch, micro, steps, val_every=0)
        prof = ProfileSteps(first, last, args.device)
        Trainer(cfg, callbacks=[prof]).fit()
        rows = [r for r in read_metrics(Path(tmp) / "run") if "loss" in r]
    profiled = last - first + 1
    wall_per_step = (prof.ends[-1] - prof.ends[0]) / profiled
    events = prof.events
    kernel_s = sum(kernel_us(e) for e in events) / 1e6 / profiled
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    step_time = statistics.median(r["step_time"] for r in rows[5:])
    stats = pstats.Stats(prof.python).stats
    ours = sorted(((v[3], f"{Path(k[0]).parent.name}/{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.items()
                   if "/work/" in k[0] or "glassbox" in k[0] or "zarr" in k[0]), reverse=True)[:TOP_OPS]
    out = {"batch": batch, "micro_batch": micro, "median_step_s": step_time, "host_wall_per_step_s": wall_per_step,
           "device_kernel_per_step_s": kernel_s, "device_busy": kernel_s / step_time if kernel_s else None,
           "host_top_ops": [{"op": e.key, "calls_per_step": e.count / profiled,
                             "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / profiled} for e in top],
           "python_cumulative": [{"function": name, "ms_per_step": 1e3 * t / profiled} for t, name in ours]}
    print(f"batch {batch} micro {micro}: step {step_time * 1e3:.1f} ms, kernels {kernel_s * 1e3:.1f} ms, "
          f"host wall {wall_per_step * 1e3:.1f} ms", flush=True)
    return out


def whole_steps_ms(run: dict[str, Any], batch: int, after: int) -> float:
    times = [r["step_time"] for r in run["rows"] if r["batch_size"] == batch and r["micro_batch_size"] == batch
             and "val_loss" not in r and r["step"] > after]
    return 1e3 * statistics.median(times) if times else float("nan")


def order_runs(args) -> dict[str, Any]:
    """fixed 64, Pollux from M0 = 32 (the bench's agent), fixed 64 again: their whole steps of 64."""
    sweep = bench.MODELS[args.model][3]
    agent = {"max_micro_batch": sweep[-1], "max_batch": 8 * sweep[-1], "decide_every": 10, "warmup_steps": 30}
    first = bench.train(args, "fixed_64", 64, 64, steps=args.order_steps)
    adaptive = bench.train(args, "pollux", 32, 32, agent, steps=2 * args.order_steps)
    again = bench.train(args, "fixed_64_again", 64, 64, steps=args.order_steps)
    return {"fixed_64": whole_steps_ms(first, 64, 20), "pollux": whole_steps_ms(adaptive, 64, 50),
            "fixed_64_again": whole_steps_ms(again, 64, 20),
            "pollux_batches": sorted({r["batch_size"] for r in adaptive["rows"]}),
            "pollux_steps_at_64": sum(r["batch_size"] == 64 for r in adaptive["rows"])}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Training step profile ({result['model']} model of bench/pollux_adaptive.py, {result['device']})", "",
             f"Machine: {m.get('gpu') or m['processor'] or m['platform']} ({m['cpu_count']} CPUs, {m['host']}); "
             f"torch {m['torch']}; blocks and loss {'compiled' if result['compile'] else 'eager'}. "
             f"Steps {result['steps']} per shape, profiled over the last 10 but 5.", "",
             "| batch | micro | median step (ms) | host wall per step (ms) | device kernels per step (ms) | "
             "device busy |", "|---:|---:|---:|---:|---:|---:|"]
    for s in result["shapes"]:
        busy = "-" if s["device_busy"] is None else f"{s['device_busy']:.2f}"
        lines.append(f"| {s['batch']} | {s['micro_batch']} | {1e3 * s['median_step_s']:.1f} | "
                     f"{1e3 * s['host_wall_per_step_s']:.1f} | {1e3 * s['device_kernel_per_step_s']:.1f} | {busy} |")
    o = result["order"]
    lines += ["", "Whole steps of 64 (median ms; Pollux's after step 50): fixed first "
              f"**{o['fixed_64']:.1f}**, Pollux **{o['pollux']:.1f}** ({o['pollux_steps_at_64']} steps at 64, "
              f"batches {o['pollux_batches']}), fixed again **{o['fixed_64_again']:.1f}**.", ""]
    for s in result["shapes"]:
        lines += [f"## Host operators, batch {s['batch']} in micro-batches of {s['micro_batch']}", "",
                  "| operator | calls per step | self CPU ms per step |", "|---|---:|---:|"]
        lines += [f"| `{t['op']}` | {t['calls_per_step']:.0f} | {t['self_cpu_ms_per_step']:.2f} |"
                  for t in s["host_top_ops"]]
        lines += ["", "| Python function (ours, zarr; cumulative) | ms per step |", "|---|---:|"]
        lines += [f"| `{t['function']}` | {t['ms_per_step']:.2f} |" for t in s["python_cumulative"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="small", choices=sorted(bench.MODELS))
    p.add_argument("--data", type=Path, help="prepared DATA_DIR (vocab 4096); default: the Pollux bench's")
    p.add_argument("--steps", type=int, default=40, help="steps per profiled shape")
    p.add_argument("--order-steps", type=int, default=200, help="steps of each fixed run of the order check")
    p.add_argument("--val-samples", type=int, default=64)
    p.add_argument("--out-name", default="train_step_profile")
    p.add_argument("--compile", action="store_true", help="torch.compile each block and the loss (parallel.compile)")
    args = p.parse_args(argv)
    args.data = bench.prepare_data(args.data, args.model)
    args.samples = 10 ** 9          # the runs end at their step counts
    bench.warm_up(args, 32)
    shapes = [profile_shape(args, b, m) for b, m in SHAPES]
    result = {"summary": {"pass_ms": {str(s["micro_batch"]): round(1e3 * s["median_step_s"], 2) for s in shapes
                                      if s["batch"] == s["micro_batch"]},
                          "device_busy": {f"{s['batch']}/{s['micro_batch']}": s["device_busy"] for s in shapes}},
              "machine": bench.machine(), "device": args.device, "model": args.model, "steps": args.steps,
              "compile": args.compile,
              "shapes": shapes}
    result["order"] = order_runs(args)
    result["summary"]["whole_step_ms_64"] = [result["order"][k] for k in ("fixed_64", "pollux", "fixed_64_again")]
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_json(bench.RESULTS / f"{args.out_name}.json", result)
    atomic.write_text(bench.RESULTS / f"{args.out_name}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
