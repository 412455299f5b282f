"""The gradient noise scale: what measuring it costs per step, and how it compares with a direct estimate.

Overhead: the same fixed-batch training (by default one micro-batch per step, `--accum` for more) with the
whole Pollux agent with its defaults (adapt_batch off so the shape stays: in one micro-batch, split steps within
the split budget and consecutive-step triples between them; with accumulation, the local per-parameter norms;
the preconditioner, the moving averages, and a throughput fit and goodput decision every 10 steps) and without
it; mean step times (a median would leave out the decision and split steps), rounds interleaved.

Accuracy: after `--steps` steps with the agent, the weights are frozen and the noise scale is measured directly
from `--direct-batches` independent micro-batches at those weights: their squared gradient norms and that of
their mean (a batch `--direct-batches` times larger), preconditioned by the same Adam weights, give the two-batch
estimators many samples each; their ratio is phi. The agent's running estimate (an EMA over the last steps'
gradients, taken while the weights moved) is compared with it.

    python bench/pollux_gns.py                                   # tiny model, CPU (~2 min on one core)
    python bench/pollux_gns.py --device cuda --model small       # one GPU (~1 min on an H200, + data prep)

Its cost is its steps: 2 x rounds x overhead-steps, then steps, then direct-batches forward/backward passes (the
measuring agent is given its micro-batch, so nothing probes the memory wall); each phase's seconds are printed as
it ends and kept in the JSON.

Writes bench/results/pollux_gns.{json,md} (CUDA) or pollux_gns_cpu.{json,md} (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from glassbox.train.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pollux_adaptive import MODELS, machine, prepare_data, run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def build(args, run_dir: Path, batch: int, micro: int, steps: int, with_agent: bool, lr_scale: float = 1.0):
    from glassbox.elastic.agent import PolluxAgent, PolluxPlan
    from glassbox.elastic.config import ElasticConfig
    from glassbox.train.trainer import Trainer

    cfg = run_config(args, run_dir, batch, micro, steps, 0)
    cfg.optimizer.lr *= lr_scale
    cfg.optimizer.min_lr *= lr_scale
    if not with_agent:
        return Trainer(cfg, callbacks=[]), None
    # The whole agent with its shape given (nothing to probe, so every run's cost is its steps): it measures, fits
    # and decides as an adaptive run does, and keeps the shape, so both runs take the same steps.
    elastic = ElasticConfig(adapt_batch=False, scale_lr=False, gns_smoothing=args.smoothing, max_micro_batch=micro)
    plan = PolluxPlan(batch, micro, 0)
    agent = PolluxAgent(elastic, plan)
    return Trainer(cfg, callbacks=[agent], plan=plan), agent


def overhead(args, micro: int) -> dict[str, Any]:
    batch = micro * args.accum
    with_gns, without, medians = [], [], {True: [], False: []}
    started = time.perf_counter()
    for i in range(args.rounds):
        for measured, out in ((False, without), (True, with_gns)):
            with tempfile.TemporaryDirectory() as tmp:
                trainer, _ = build(args, Path(tmp) / "run", batch, micro, args.overhead_steps, measured)
                trainer.fit()
                from glassbox.train.metrics_log import read_metrics

                rows = [r for r in read_metrics(Path(tmp) / "run") if "loss" in r]
            times = [r["step_time"] for r in rows[5:] if "val_loss" not in r]
            out.append(statistics.fmean(times))
            medians[measured].append(statistics.median(times))
            print(f"overhead round {i + 1}/{args.rounds} {'with' if measured else 'without'} the agent: mean step "
                  f"{out[-1] * 1e3:.2f} ms ({time.perf_counter() - started:.0f} s so far)", flush=True)
    base, gns = statistics.median(without), statistics.median(with_gns)
    return {"batch": batch, "micro_batch": micro, "step_s_without": base, "step_s_with_gns": gns,
            "overhead": gns / base - 1.0, "median_step_s_without": statistics.median(medians[False]),
            "median_step_s_with_gns": statistics.median(medians[True]), "rounds": args.rounds,
            "steps": args.overhead_steps,
            "per_round_without": without, "per_round_with": with_gns, "wall_s": time.perf_counter() - started}


def direct_noise_scale(trainer, agent, micro: int, count: int) -> dict[str, Any]:
    """phi at the current weights from `count` independent micro-batches of `micro` samples (no update)."""
    from glassbox.elastic.gns import two_batch_estimates

    state = trainer.state
    model = state.model
    weights = agent.meter.preconditioner(state.step + 10**9)     # the current Adam second moment
    params = agent.meter.params
    sampler = state.sampler
    start = sampler.cursor
    tokens = sampler.samples(start, micro * count)
    def weighted(tensors: list[torch.Tensor]) -> float:
        return float((weights * torch.stack(torch._foreach_norm(tensors, 2.0)).float().pow(2)).sum())

    small, pairs, total, previous = [], [], [torch.zeros_like(p) for p in params], None
    for i in range(count):
        chunk = tokens[i * micro:(i + 1) * micro].to(trainer.world.device)
        model.zero_grad(set_to_none=True)
        with trainer._autocast():
            logits = model(chunk[:, :-1])
        trainer._loss(logits, chunk[:, 1:]).backward()
        grads = [p.grad for p in params]
        small.append(weighted(grads))
        torch._foreach_add_(total, grads)
        if i % 2 == 0:
            previous = [g.detach().clone() for g in grads]
        else:
            # What one step split in two halves of `micro` would measure: |g_1|^2 against |(g_1 + g_2) / 2|^2.
            pair = weighted(torch._foreach_mul(torch._foreach_add(previous, grads), 0.5))
            pairs.append(two_batch_estimates(micro, small[-2], 2 * micro, pair))
    model.zero_grad(set_to_none=True)
    big = weighted([t / count for t in total])
    sqr, trace = two_batch_estimates(micro, statistics.fmean(small), micro * count, big)
    # The spread of the one-split estimates says how many a running average needs: |G|^2 is a small difference of
    # two large norms when phi is many times the batch.
    split_sqr = [s for s, _ in pairs]
    return {"grad_sqr": sqr, "trace": trace, "noise_scale": trace / sqr, "micro_batches": count,
            "micro_batch": micro, "split_grad_sqr_rel_std": statistics.stdev(split_sqr) / sqr if len(pairs) > 1
            else None, "split_trace_rel_std": statistics.stdev(t for _, t in pairs) / trace if len(pairs) > 1
            else None}


def accuracy(args, micro: int) -> dict[str, Any]:
    batch = micro * args.accum
    with tempfile.TemporaryDirectory() as tmp:
        trainer, agent = build(args, Path(tmp) / "run", batch, micro, args.steps, True)
        started = time.perf_counter()
        trainer.fit()
        train_s = time.perf_counter() - started
        running = agent.ema.noise_scale
        print(f"accuracy: {args.steps} steps in {train_s:.0f} s, running phi {running:.1f}", flush=True)
        started = time.perf_counter()
        direct = direct_noise_scale(trainer, agent, micro, args.direct_batches)
        direct_s = time.perf_counter() - started
        print(f"direct phi {direct['noise_scale']:.1f} from {args.direct_batches} micro-batches in {direct_s:.0f} s",
              flush=True)
    return {"steps": args.steps, "batch": batch, "micro_batch": micro, "running_noise_scale": running,
            "running_grad_sqr": agent.ema.grad_sqr, "running_trace": agent.ema.trace, "direct": direct,
            "ratio_running_to_direct": running / direct["noise_scale"], "train_s": train_s, "direct_s": direct_s}


class DirectEvery(Callback):
    """Every `every` steps, with the loop drained (needs_state), the direct noise scale at the current weights
    beside the agent's running estimate: the trajectory of both along a run."""

    def __init__(self, agent, micro: int, count: int, every: int):
        self.agent, self.micro, self.count, self.every = agent, micro, count, every
        self.rows: list[dict[str, Any]] = []
        self.trainer = None

    def setup(self, trainer) -> None:
        self.trainer = trainer

    def needs_state(self, step: int) -> bool:
        return step % self.every == 0

    def on_step_end(self, state) -> None:
        if state.step % self.every or not self.agent.ema.ready:
            return
        direct = direct_noise_scale(self.trainer, self.agent, self.micro, self.count)
        agent, ema = self.agent, self.agent.ema
        running = ema.noise_scale
        by_source = {k: e.noise_scale if e.ready else None for k, e in (("split", agent.split_ema),
                                                                          ("triple", agent.triple_ema))}
        self.rows.append({"step": state.step, "samples": state.samples, "running_noise_scale": running,
                          "direct_noise_scale": direct["noise_scale"], "ratio": running / direct["noise_scale"],
                          "running_grad_sqr": ema.grad_sqr, "running_trace": ema.trace,
                          "source": agent.gns_source, "running_by_source": by_source, "direct": direct})
        print(f"trajectory step {state.step} ({state.samples} samples): running phi {running:.1f} (split "
              f"{by_source['split']}, triples {by_source['triple']}), direct {direct['noise_scale']:.1f} (one "
              f"split's |G|^2 spread {direct['split_grad_sqr_rel_std']:.2f}x)", flush=True)


def trajectory(args, micro: int) -> dict[str, Any]:
    """The running estimates (split steps', consecutive triples', and the one decisions would use) against the
    direct one along a run at batch `--trajectory-batch` in one micro-batch, its peak LR scaled by `--lr-scale`."""
    batch = args.trajectory_batch
    with tempfile.TemporaryDirectory() as tmp:
        trainer, agent = build(args, Path(tmp) / "run", batch, batch, args.trajectory_steps, True,
                               lr_scale=args.lr_scale)
        probe = DirectEvery(agent, micro, args.direct_batches, args.trajectory_every)
        probe.setup(trainer)
        trainer.callbacks.append(probe)
        started = time.perf_counter()
        trainer.fit()
    return {"batch": batch, "lr_scale": args.lr_scale, "steps": args.trajectory_steps, "every": args.trajectory_every,
            "rows": probe.rows, "wall_s": time.perf_counter() - started}


def markdown(result: dict) -> str:
    m, o, a = result["machine"], result["overhead"], result["accuracy"]
    return "\n".join([
        f"# Gradient noise scale: overhead and accuracy ({result['model']} model, {result['device']})", "",
        f"Machine: {m.get('gpu') or m['processor'] or m['platform']} ({m['cpu_count']} CPUs, {m['host']}); "
        f"torch {m['torch']}; load average {m.get('load_average', 0):.1f} at the start, "
        f"{result.get('load_average_end', 0):.1f} at the end.", "",
        "| measure | value |", "|---|---|",
        f"| mean step, no agent (batch {o['batch']}, micro {o['micro_batch']}) | {o['step_s_without'] * 1e3:.2f} ms |",
        f"| mean step, whole agent (noise scale every step, a decision every 10) | "
        f"{o['step_s_with_gns'] * 1e3:.2f} ms |",
        f"| agent overhead ({o['rounds']} interleaved rounds of {o['steps']} steps) | "
        f"**{100 * o['overhead']:.2f}%** |",
        f"| median steps, without / with | {o['median_step_s_without'] * 1e3:.2f} / "
        f"{o['median_step_s_with_gns'] * 1e3:.2f} ms |",
        f"| running phi after {a['steps']} steps (EMA) | {a['running_noise_scale']:.1f} samples |",
        f"| direct phi from {a['direct']['micro_batches']} micro-batches of {a['direct']['micro_batch']} | "
        f"{a['direct']['noise_scale']:.1f} samples |",
        f"| running / direct | **{a['ratio_running_to_direct']:.3f}** |", "",
        f"Bench cost: overhead rounds {o['wall_s']:.0f} s, {a['steps']} training steps {a['train_s']:.0f} s, direct "
        f"estimate {a['direct_s']:.0f} s; {result['wall_s']:.0f} s in all.", ""])


def main(argv: list[str] | None = None) -> int:
    from glassbox.elastic.config import ElasticConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--data", type=Path)
    p.add_argument("--val-samples", type=int, default=16)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (1: consecutive-step triples)")
    p.add_argument("--steps", type=int, default=150, help="training steps before the direct estimate")
    p.add_argument("--overhead-steps", type=int, default=0,
                   help="steps per overhead run (0: 200 on the CPU, where contention is noisy, 60 on a GPU)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved overhead rounds (0: 5 on the CPU, 3 on a GPU)")
    p.add_argument("--direct-batches", type=int, default=128)
    p.add_argument("--smoothing", type=float, default=ElasticConfig().gns_smoothing)
    p.add_argument("--trajectory-batch", type=int, default=0,
                   help="instead of overhead and accuracy: train at this batch and compare running and direct phi "
                        "every --trajectory-every steps (writes pollux_gns_trajectory*.json)")
    p.add_argument("--trajectory-steps", type=int, default=600)
    p.add_argument("--trajectory-every", type=int, default=100)
    p.add_argument("--lr-scale", type=float, default=1.0, help="the trajectory run's peak and final LR multiplier")
    args = p.parse_args(argv)
    args.overhead_steps = args.overhead_steps or (200 if args.device == "cpu" else 60)
    args.rounds = args.rounds or (5 if args.device == "cpu" else 3)
    if args.device == "cpu":
        # One thread, as in pollux_adaptive.py: on a shared box a descheduled second OpenMP thread stalls every
        # kernel, and the overhead is a ratio of two step times that such stalls swamp.
        torch.set_num_threads(1)
    args.data = prepare_data(args.data, args.model)
    micro = MODELS[args.model][3][0]
    suffix = "" if args.device == "cuda" else "_cpu"
    started = time.perf_counter()
    if args.trajectory_batch:
        result = {"machine": machine(), "device": args.device, "model": args.model,
                  "trajectory": trajectory(args, micro), "load_average_end": os.getloadavg()[0]}
        rows = result["trajectory"]["rows"]
        result["summary"] = {"ratio_running_to_direct": [r["ratio"] for r in rows],
                             "direct_noise_scale": [r["direct_noise_scale"] for r in rows],
                             "samples": [r["samples"] for r in rows]}
        name = f"pollux_gns_trajectory_b{args.trajectory_batch}{suffix}.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["summary"], indent=2))
        return 0
    result = {"machine": machine(), "device": args.device, "model": args.model,
              "overhead": overhead(args, micro), "accuracy": accuracy(args, micro)}
    result["wall_s"] = time.perf_counter() - started
    result["load_average_end"] = os.getloadavg()[0]
    result["summary"] = {"gns_overhead": result["overhead"]["overhead"],
                         "ratio_running_to_direct": result["accuracy"]["ratio_running_to_direct"],
                         "bench_wall_s": result["wall_s"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pollux_gns{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"pollux_gns{suffix}.md").write_text(markdown(result))
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
