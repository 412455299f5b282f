"""Pollux's adaptive batch against fixed batches: time and samples to a target validation loss.

Runs, in this process, through the real trainer on the same data and sample budget: one fixed-batch run per size
of the sweep (the peak LR as configured, the schedule in steps of that batch: what a user sweeping batch sizes
gets), and one Pollux run starting at the smallest size M0 (glassbox.elastic.agent: goodput-chosen batch and
micro-batch, sqrt-AdaScale LR, the schedule following efficiency-weighted progress), not told which size is best.
The target is the worst of the runs' best validation losses, so every run reaches it; the time (the sum of the
run's own step times, validation included, as every run validates every ~1/32 of the budget) and the samples to
reach it are interpolated between validations. Also the agent's overhead: the mean step time (decision steps
included) of a fixed run at M0 in one micro-batch with the whole agent on (splitting steps within its budget to
measure the noise scale, fitting and deciding every 10 steps, adapt_batch off so the shape stays) over the same
run without it, rounds interleaved, from the first decision on (the denser splits before it, a once-per-run cost,
are reported beside it).

    python bench/pollux_adaptive.py                                     # tiny model on the CPU (~6 min, 1 core)
    python bench/pollux_adaptive.py --device cuda --model small         # ~95M parameters, one H200 (~6 min)
    python bench/pollux_adaptive.py --device cuda --model small --compile   # every run with compiled blocks

Writes bench/results/pollux_adaptive.{json,md,png} (CUDA) or pollux_adaptive_cpu.{json,md,png} (CPU); the
summary holds time_ratio_vs_best_fixed, time_ratio_vs_median_fixed and gns_overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from glassbox import atomic
from glassbox.train.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

MODELS = {
    # (model overrides, seq_len, sample budget, batch sweep, peak lr). The tiny model's samples are 8 tokens: on a
    # CPU a step's fixed cost (dispatch, optimizer, bookkeeping) is then several samples' compute, so larger
    # batches raise throughput as they do on a GPU, and a sample's gradient is noisy enough (phi in samples grows
    # as tokens per sample shrink) that the goodput-best batch moves above M0 as training goes on. At 64 tokens a
    # CPU step costs ~per sample alone, and the agent rightly keeps M0 for the whole run. The small model's
    # budget is 65536 samples: at 32768 (session 10) the worst run, batch 256, had 128 steps, and its best loss,
    # the target, was one that batch 32 passed at 13% of its samples, in the first 5 s of training: where the
    # noise scale is smallest and the smallest batch always wins, not the training run Pollux adapts over.
    "tiny": ({"vocab_size": 4096, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 192, "max_seq_len": 64, "tie_embeddings": True}, 8, 12288, [8, 16, 32, 64], 3e-3),
    "small": ({"vocab_size": 4096, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 12,
               "intermediate_size": 2304, "max_seq_len": 256, "tie_embeddings": True}, 256, 65536,
              [32, 64, 128, 256], 6e-4),
}


DECISION_KEYS = ("step", "samples", "batch", "micro_batch", "accum_steps", "lr_scale", "noise_scale", "switched",
                 "efficiency", "predicted_goodput", "best", "decide_s", "throughput_params", "measure_every",
                 "gns_source", "noise_scale_split", "noise_scale_triple", "split_grad_sqr_rel_error")
DECISION_STRIDE = 5


def machine() -> dict[str, Any]:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "processor": platform.processor(),
            "load_average": os.getloadavg()[0]}      # a shared machine's CPU timings are only as good as this
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# Corpus bytes per model: the small model's 256-token samples need ~8x the tiny one's text for a validation
# split that holds `--val-samples` (4 MB gave 18 validation samples at seq_len 256).
DATA_BYTES = {"tiny": 4_000_000, "small": 32_000_000}


def prepare_data(path: Path | None, model: str) -> Path:
    """The prepared corpus at `path`, or by default one per model in the temp dir (prepared once, then reused)."""
    from glassbox.data.prepare import prepare

    path = path or Path(tempfile.gettempdir()) / f"glassbox-bench-pollux-data-{model}"
    if not (path / "meta.json").exists():
        prepare(["stdlib"], path, vocab_size=4096, max_bytes=DATA_BYTES[model], progress=False)
    return path


def run_config(args, run_dir: Path, batch: int, micro: int, steps: int, val_every: int):
    from glassbox.config import from_dict
    from glassbox.train.config import RunConfig

    model, seq, _, _, lr = MODELS[args.model]
    return from_dict(RunConfig, {
        "model": model, "data": {"path": str(args.data), "seq_len": seq, "seed": 1234},
        "optimizer": {"lr": lr, "min_lr": lr / 10},
        "schedule": {"steps": steps, "warmup_steps": max(1, steps // 20)},
        "batch": {"global_batch_size": batch, "micro_batch_size": micro},
        "parallel": {"device": args.device, "data_parallel": "fsdp", "compile": args.compile},
        "checkpoint": {"save_final": False},
        "logging": {"val_every": val_every, "val_samples": args.val_samples, "progress": False,
                    "wandb": {"mode": "disabled"}},
        "run_dir": str(run_dir),
    })


class StopAtBudget(Callback):
    """Ends a run once it has seen the sample budget (a Pollux run's steps grow, its step count does not)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.trainer = None

    def setup(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, state) -> None:
        if state.samples >= self.budget:
            self.trainer.request_stop()


def train(args, name: str, batch: int, micro: int, agent: dict | None = None, steps: int | None = None
          ) -> dict[str, Any]:
    """One run; its per-step rows and its decisions."""
    from glassbox.elastic.agent import PolluxAgent, PolluxPlan
    from glassbox.elastic.config import ElasticConfig
    from glassbox.train.metrics_log import read_metrics
    from glassbox.train.trainer import Trainer

    budget = args.samples
    steps = steps or budget // batch
    val_every = max(1, budget // 32 // batch)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(args, Path(tmp) / name, batch, micro, steps, val_every)
        callbacks, plan = [StopAtBudget(budget)], None
        if agent is not None:
            elastic = ElasticConfig(**agent)
            plan = PolluxPlan(batch, micro, elastic.measure_every)
            callbacks.append(PolluxAgent(elastic, plan))
        started = time.perf_counter()
        trainer = Trainer(cfg, callbacks=callbacks, plan=plan)
        trainer.fit()
        wall = time.perf_counter() - started
        rows = read_metrics(Path(tmp) / name)
        steps_rows = [r for r in rows if "loss" in r]
        # A fixed run's last step is a validation step (its schedule ends there); a Pollux run stops at the sample
        # budget between two validations: its final loss is measured here, on the same validation samples, and
        # counts in no time to target.
        final = steps_rows[-1].get("val_loss")
        if final is None:
            total, count = trainer._validation_sums().tolist()
            final = total / count
    print(f"{name}: {len(steps_rows)} steps, {steps_rows[-1]['samples']} samples, {wall:.1f} s, final val "
          f"{final:.4f} (step {steps_rows[-1]['step']})", flush=True)
    samples_at = {r["step"]: r["samples"] for r in steps_rows}
    decisions = [{**r, "samples": samples_at.get(r["step"])} for r in rows if r.get("event") == "pollux"]
    trusted = next((r["step"] for r in rows if r.get("event") == "pollux_split_trusted"), None)
    return {"name": name, "batch": batch, "wall_s": wall, "rows": steps_rows, "decisions": decisions,
            "final_val_loss": final, "split_trusted_step": trusted}


def warm_up(args, m0: int) -> None:
    """Throwaway runs before any timed one: the process's one-time costs (allocator, kernels, data cache) would
    otherwise land on whichever timed run comes first. Three shapes, M0 whole, split and doubled: with --compile
    the second makes dynamo compile the blocks and the loss with a dynamic batch dimension, and the third the same
    graphs for larger batches (inductor's fusion decisions guard on the batch: for the small model a graph built
    at 16 holds for batches up to 26 only, and the adaptive run's first explore step at 64 spent 3.7 s compiling).
    Later runs' shapes reuse them (a new model of the same architecture recompiles nothing), so no timed run pays
    for compiling."""
    train(args, "warmup", m0, m0, steps=20)
    train(args, "warmup_split", m0, m0 // 2, steps=10)
    train(args, "warmup_double", 2 * m0, 2 * m0, steps=10)


def curve(run: dict) -> list[tuple[float, int, float]]:
    """(seconds, samples, validation loss) at each validation."""
    t, out = 0.0, []
    for r in run["rows"]:
        t += r["step_time"]
        if "val_loss" in r:
            out.append((t, r["samples"], r["val_loss"]))
    return out


def batch_segments(rows: list[dict]) -> list[dict]:
    """The run's batch size over steps, as runs of equal batch: first and last step, samples before it, and its
    usual micro-batch (every few steps of one micro-batch are split in two to measure the noise scale)."""
    out: list[dict] = []
    micros: list[list[int]] = []
    for r in rows:
        if out and out[-1]["batch"] == r["batch_size"]:
            out[-1]["last_step"] = r["step"]
        else:
            out.append({"batch": r["batch_size"], "first_step": r["step"], "last_step": r["step"],
                        "samples_before": r["samples"] - r["batch_size"]})
            micros.append([])
        micros[-1].append(r["micro_batch_size"])
    for segment, seen in zip(out, micros):
        segment["micro_batch"] = statistics.mode(seen)
    return out


def to_target(points: list[tuple[float, int, float]], target: float) -> tuple[float, float]:
    """Seconds and samples when the validation loss first reaches `target` (linear between validations)."""
    prev = (0.0, 0, float("inf"))
    for t, n, loss in points:
        if loss <= target:
            if prev[2] == float("inf"):
                return t, float(n)
            f = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + f * (t - prev[0]), prev[1] + f * (n - prev[1])
        prev = (t, n, loss)
    raise RuntimeError("target not reached")


def gns_overhead(args, m0: int, agent: dict) -> dict[str, Any]:
    """Mean step time with the whole agent (measuring the noise scale, fitting and deciding every `decide_every`
    steps; adapt_batch off so both runs take the same steps) over without it, at M0 in one micro-batch, the
    shape the adaptive run starts in; rounds interleaved, the overhead the median of the rounds' ratios of
    means. The mean, not the median: a decision lands on one step in ten, and a split step on one in several,
    which a median would leave out. The steady state: steps from the one the first decision shapes on, with the
    adaptive run's warm-up (until then the agent splits every other step, which is what makes the split estimate
    trusted and ends the triples' per-step gradient copy and norms, as it does in the adaptive run), a
    once-per-run cost reported beside it, with the step the splits were trusted at in each round."""
    with_agent, without, medians = [], [], {"with": [], "without": []}
    steps = args.overhead_steps
    measuring = {**agent, "adapt_batch": False, "scale_lr": False}
    decide_every = measuring["decide_every"]
    steady_from = -(-measuring["warmup_steps"] // decide_every) * decide_every + 2
    warmup_extra, split_counts, trusted = [], [], []
    for round_ in range(args.overhead_rounds):
        # Which run goes first alternates, so a drift across a round's two runs cancels over the rounds.
        pair = [(None, "without"), (measuring, "with")]
        runs = {key: train(args, "overhead" + ("_agent" if config else ""), m0, m0, config, steps=steps)
                for config, key in (pair if round_ % 2 == 0 else pair[::-1])}
        rows = {key: [r for r in run["rows"] if "val_loss" not in r and r["step"] > 5] for key, run in runs.items()}
        for key, out in (("without", without), ("with", with_agent)):
            times = [r["step_time"] for r in rows[key] if r["step"] >= steady_from]
            out.append(statistics.fmean(times))
            medians[key].append(statistics.median(times))
        trusted.append(runs["with"]["split_trusted_step"])
        early = [r["step_time"] for r in rows["with"] if r["step"] < steady_from]
        warmup_extra.append(sum(early) - len(early) * without[-1])
        split_counts.append(sum(r["micro_batch_size"] < r["batch_size"] for r in rows["with"]
                                if r["step"] >= steady_from))
    base, measured = statistics.median(without), statistics.median(with_agent)
    # Each round's pair ran back to back: their ratio cancels the drift between rounds (on the H200 a host-bound
    # step's mean moved 21-33 ms between identical runs a minute apart), which a ratio of medians keeps.
    ratios = [w / wo for w, wo in zip(with_agent, without)]
    return {"step_s_without": base, "step_s_with_gns": measured, "overhead": statistics.median(ratios) - 1.0,
            "round_ratios": ratios,
            "median_step_s_without": statistics.median(medians["without"]),
            "median_step_s_with_gns": statistics.median(medians["with"]),
            "decide_every": decide_every, "rounds": args.overhead_rounds, "steps": steps, "steady_from": steady_from,
            "split_steps_steady": statistics.median(split_counts), "warmup_extra_s": statistics.median(warmup_extra),
            "split_trusted_steps": trusted,
            "batch": m0, "micro_batch": m0}


def plot(runs: list[dict], target: float, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:     # an image without it still gets the JSON and the table
        print(f"matplotlib is not installed: no {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        pts = curve(run)
        ax.plot([p[0] for p in pts], [p[2] for p in pts], label=run["name"], lw=2 if run["name"] == "pollux" else 1)
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="target")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss")
    ax.legend()
    adaptive = runs[-1]
    bx.step([r["samples"] for r in adaptive["rows"]], [r["batch_size"] for r in adaptive["rows"]], where="post",
            color="C4", label="Pollux batch size")
    bx.set_xlabel("samples")
    bx.set_ylabel("global batch (samples)")
    decided = [d for d in adaptive["decisions"] if d.get("noise_scale") is not None and d.get("samples")]
    if decided:
        phi = bx.twinx()
        phi.plot([d["samples"] for d in decided], [d["noise_scale"] for d in decided], color="C1", ls=":",
                 label="noise scale phi (EMA)")
        phi.set_ylabel("phi (samples)")
        phi.legend(loc="lower right")
    bx.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def overhead_text(o: dict[str, Any] | None, s: dict[str, Any]) -> str:
    """The agent-overhead sentence of the markdown (None: the run stopped before its overhead rounds)."""
    if o is None:
        return "Agent overhead: not measured yet (this file is rewritten once the overhead rounds finish)."
    return (f"Agent overhead: mean step {o['step_s_with_gns'] * 1e3:.2f} ms with the whole agent (split steps "
            f"for the noise scale, {o['split_steps_steady']:.0f} of the {o['steps'] - o['steady_from'] + 1} "
            f"steps from step {o['steady_from']} on, a decision every {o['decide_every']} steps) vs "
            f"{o['step_s_without'] * 1e3:.2f} ms without (batch {o['batch']} in one micro-batch, {o['rounds']} "
            f"interleaved rounds of {o['steps']} steps): **{100 * s['gns_overhead']:.2f}%**, the median of the "
            f"rounds' ratios ({', '.join(f'{r:.3f}' for r in o.get('round_ratios', []))}; medians "
            f"{o['median_step_s_with_gns'] * 1e3:.2f} vs {o['median_step_s_without'] * 1e3:.2f} ms); before "
            f"the first decision, every other step split: {o['warmup_extra_s'] * 1e3:.0f} ms once per run "
            f"(splits trusted at step {', '.join(str(t or 'never') for t in o.get('split_trusted_steps', []))}).")


def markdown(result: dict) -> str:
    s, m = result["summary"], result["machine"]
    lines = [f"# Pollux adaptive batch vs fixed batches ({result['model']} model, {result['device']})", "",
             f"Machine: {m.get('gpu') or m['processor'] or m['platform']} ({m['cpu_count']} CPUs, {m['host']}); "
             f"torch {m['torch']}; load average {m.get('load_average', 0):.1f}. Target validation loss "
             f"{result['target']:.4f} (the worst run's best); "
             f"budget {result['budget_samples']} samples.", "",
             "| run | batch | time to target (s) | samples to target | steps to target | ms per step to target | "
             "final val loss | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {r['batches']} | {r['time_to_target_s']:.2f} | {r['samples_to_target']:.0f} | "
                     f"{r['steps_to_target']} | {1e3 * r['time_to_target_s'] / r['steps_to_target']:.1f} | "
                     f"{r['final_val_loss']:.4f} | {r['wall_s']:.1f} |")
    o, c = result["gns_overhead"], result["adaptive_cost_to_target"]
    lines += ["", f"Adaptive / best fixed (time to target): **{s['time_ratio_vs_best_fixed']:.3f}** (best fixed: "
              f"{s['best_fixed']}); adaptive / median fixed: **{s['time_ratio_vs_median_fixed']:.3f}**.",
              overhead_text(o, s) + " The final validation loss is measured at each run's last step.", "",
              f"The Pollux run to the target: {c['steps']} steps (median {c['median_step_s'] * 1e3:.1f} ms), "
              f"{c['explore_steps']} of them exploring for the throughput fit "
              f"({', '.join(f'{b} in micro-batches of {m}' for b, m in c['explore_shapes']) or 'none'}; "
              f"{c['explore_steps_s']:.2f} s), {c['split_steps']} split to measure the noise scale "
              f"({c['split_steps_s']:.2f} s), {c['decisions']} decisions ({c['decide_s'] * 1e3:.0f} ms in all).", "",
              "## The Pollux run's batch size over steps", "",
              "| steps | samples from | batch | micro-batch |", "|---|---:|---:|---:|"]
    lines += [f"| {g['first_step']}-{g['last_step']} | {g['samples_before']} | {g['batch']} | {g['micro_batch']} |"
              for g in result["adaptive_batches"]]
    lines += ["", "## The Pollux run's decisions", "",
              f"Every shape change, and every {DECISION_STRIDE}th decision between them: the smoothed noise scale "
              "phi, the chosen batch (micro-batch x accumulation), the LR scale sqrt(r), the statistical efficiency "
              "E(M), and the predicted goodput (efficiency-weighted samples/s) of the shape it ran against the best "
              "candidate's (a switch needs > 5% more), the steps between split steps that keeps their cost "
              "within the budget, and which estimate phi is (split steps or consecutive triples) beside the two. "
              "The split estimate was first precise (and decisions moved to it for good) at step "
              f"{result.get('split_trusted_step') or 'never'}.", "",
              "| step | samples | phi | from | split / triple phi | batch | micro x accum | LR scale | E(M) | "
              "goodput: ran / best | switched | split every |",
              "|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---|---:|"]
    decisions = result["decisions"]
    for i, d in enumerate(decisions):
        if not (d.get("switched") or i % DECISION_STRIDE == 0 or i == len(decisions) - 1):
            continue
        phi = "-" if d.get("noise_scale") is None else f"{d['noise_scale']:.1f}"
        goodput = "-" if d.get("predicted_goodput") is None else \
            f"{d['predicted_goodput']:.1f} / {d['best']['goodput']:.1f}"
        both = " / ".join("-" if d.get(f"noise_scale_{k}") is None else f"{d[f'noise_scale_{k}']:.1f}"
                          for k in ("split", "triple"))
        lines.append(f"| {d['step']} | {d.get('samples') or '-'} | {phi} | {d.get('gns_source', '-')} | {both} | "
                     f"{d['batch']} | {d['micro_batch']} x "
                     f"{d.get('accum_steps', '-')} | {d['lr_scale']:.3f} | {d.get('efficiency', 1.0):.3f} | "
                     f"{goodput} | {'yes' if d.get('switched') else ''} | {d.get('measure_every', '-')} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--data", type=Path, help="prepared DATA_DIR (vocab 4096); default: prepared into the temp dir")
    p.add_argument("--samples", type=int, default=0, help="sample budget of every run (0: the model's default)")
    p.add_argument("--val-samples", type=int, default=64)
    p.add_argument("--overhead-steps", type=int, default=130)
    p.add_argument("--overhead-rounds", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="torch.compile each block and the loss (parallel.compile)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        # One thread: on a shared box a second OpenMP thread that gets descheduled stalls every kernel, which
        # inflates the per-sample time the agent's throughput fit sees far more than the per-step overhead.
        torch.set_num_threads(1)
    args.data = prepare_data(args.data, args.model)
    _, _, default_budget, sweep, _ = MODELS[args.model]
    args.samples = budget = args.samples or default_budget
    m0 = sweep[0]
    micro_cap = sweep[-1]
    warm_up(args, m0)
    # Pollux starts at M0 in one micro-batch, as fixed_M0 does, with the agent's defaults for the noise scale:
    # every other step split in halves until the first decision, then as often as 3% of the step time pays for
    # (on a GPU a split step of a small model costs ~1.5 steps). From its first decision on it picks the
    # micro-batch itself. The first decision waits 30 steps, 15 measurements: one split of M0 = 32 reads |G|^2
    # to within about its own size this early (bench/results/pollux_gns_trajectory_h200.md).
    agent = {"max_micro_batch": micro_cap, "max_batch": 8 * sweep[-1], "decide_every": 10, "warmup_steps": 30}
    adaptive = train(args, "pollux", m0, m0, agent, steps=budget // m0)
    runs = [train(args, f"fixed_{b}", b, min(b, micro_cap)) for b in sweep] + [adaptive]
    target = max(min(p[2] for p in curve(r)) for r in runs)
    table = []
    for r in runs:
        t, n = to_target(curve(r), target)
        table.append({"name": r["name"], "batches": sorted({row["batch_size"] for row in r["rows"]}),
                      "time_to_target_s": t, "samples_to_target": n, "final_val_loss": r["final_val_loss"],
                      "steps_to_target": next(row["step"] for row in r["rows"] if row["samples"] >= n),
                      "wall_s": r["wall_s"], "steps": len(r["rows"])})
    fixed = [row for row in table if row["name"].startswith("fixed")]
    adaptive = table[-1]
    best = min(fixed, key=lambda row: row["time_to_target_s"])
    median_time = statistics.median(row["time_to_target_s"] for row in fixed)
    # Where the adaptive run's time to target went: its steps, those before its first decision in another shape
    # than M0's (exploration for the throughput fit), its decisions.
    before = [r for r in runs[-1]["rows"] if r["step"] <= adaptive["steps_to_target"]]
    first_decision = min((d["step"] for d in runs[-1]["decisions"]), default=0)
    explored = [r for r in before if r["step"] < first_decision and r["batch_size"] != m0]
    explored_steps = {r["step"] for r in explored}
    split = [r for r in before if r["micro_batch_size"] < r["batch_size"] and r["step"] not in explored_steps]
    decided = [d for d in runs[-1]["decisions"] if d["step"] <= adaptive["steps_to_target"]]
    adaptive_cost = {"steps": len(before), "explore_steps": len(explored),
                     "explore_shapes": sorted({(r["batch_size"], r["micro_batch_size"]) for r in explored}),
                     "explore_steps_s": sum(r["step_time"] for r in explored),
                     "split_steps": len(split), "split_steps_s": sum(r["step_time"] for r in split),
                     "decisions": len(decided), "decide_s": sum(d.get("decide_s", 0.0) for d in decided),
                     "median_step_s": statistics.median(r["step_time"] for r in before)}
    suffix = "" if args.device == "cuda" else "_cpu"
    result = {
        "summary": {"time_ratio_vs_best_fixed": adaptive["time_to_target_s"] / best["time_to_target_s"],
                    "time_ratio_vs_median_fixed": adaptive["time_to_target_s"] / median_time,
                    "gns_overhead": None, "best_fixed": best["name"],
                    "samples_ratio_vs_best_fixed": adaptive["samples_to_target"] / best["samples_to_target"],
                    "adaptive_batch_sizes": [g["batch"] for g in batch_segments(runs[-1]["rows"])],
                    "adaptive_lr_scale_max": max((d["lr_scale"] for d in runs[-1]["decisions"]), default=1.0)},
        "machine": machine(), "device": args.device, "model": args.model, "budget_samples": budget,
        "target": target, "runs": table, "curves": {r["name"]: curve(r) for r in runs}, "gns_overhead": None,
        "adaptive_cost_to_target": adaptive_cost,
        "adaptive_step_times": [[r["step"], r["batch_size"], r["micro_batch_size"], round(r["step_time"], 5)]
                                for r in runs[-1]["rows"]],
        "adaptive_batches": batch_segments(runs[-1]["rows"]),
        "decisions": [{k: v for k, v in d.items() if k in DECISION_KEYS} for d in runs[-1]["decisions"]],
        "split_trusted_step": runs[-1]["split_trusted_step"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Written twice: the comparison first, so that a device call cut short in the overhead rounds keeps it.
    write_results(result, suffix)
    plot(runs, target, RESULTS / f"pollux_adaptive{suffix}.png")
    print(json.dumps(result["summary"], indent=2), flush=True)
    overhead = gns_overhead(args, m0, agent)
    result["gns_overhead"], result["summary"]["gns_overhead"] = overhead, overhead["overhead"]
    write_results(result, suffix)
    print(json.dumps(result["summary"], indent=2))
    return 0


def write_results(result: dict[str, Any], suffix: str) -> None:
    atomic.write_json(RESULTS / f"pollux_adaptive{suffix}.json", result)
    atomic.write_text(RESULTS / f"pollux_adaptive{suffix}.md", markdown(result))


if __name__ == "__main__":
    sys.exit(main())
