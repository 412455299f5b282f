"""The engine's host time per step: what scheduling, sampling's bookkeeping, appending tokens, stop checks,
detokenization and building outputs cost on the host, apart from the model.

On a GPU the engine's step is synchronous: the device waits while the host does this work, so it adds to every
step. On the H200 (bench/results/serving_perf_h200.md) batch 32 of the 350M model decodes at 2.76 ms a step where
its weights take ~0.2 ms to read, and 170 running sequences under load at 9.5 ms a step: the host's share is most
of both. Here a tiny model (2 layers, hidden 64) on the CPU makes that share measurable anywhere: each step's wall
time minus the time inside the model runner (`ModelRunner.execute`: input preparation and the forward), per step
and per running sequence, for greedy and for seeded top-p sampling, at several batch sizes (every request
decodes `--tokens` tokens, EOS ignored, with a real byte-level BPE tokenizer detokenizing each one, prefix
caching on as in serving). The sampler runs outside the runner, so its tensor work counts here too: next to
nothing for greedy (one argmax), most of the top-p rows on a CPU (the sort over the vocabulary), which a GPU runs
as kernels; the greedy rows are the engine's bookkeeping.

Session 16, side by side on the 2-core vm (alternating rounds): BlockManager.commit starting after the blocks
already published and the scheduler's units-below by index took batch 256 greedy from 27.6 / 30.8 to 24.4 / 27.2
us a sequence per step (batch 32: 23.1 / 25.7 to 21.9 / 24.5); then the scheduler taking a lone sequence that
decodes in place without planning it, host / model time at 256 greedy from 0.739 / 0.709 / 0.805 to 0.641 / 0.667
/ 0.647 (three rounds of five runs; the vm's speed drifted 1.6x between rounds, so the ratio is the comparison).

    python bench/engine_host_overhead.py      # writes bench/results/engine_host_overhead_cpu.{json,md}

The summary holds host_us_per_seq_step_b256 (greedy), host_ms_per_step_b1 and host_ms_per_step_b32 (greedy), and
the seeded top-p figure at 256, host_us_per_seq_step_b256_top_p: medians over --rounds runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.data.tokenizer import EOT, train_bpe
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.tokenizer import Tokenizer
from glassbox.models.transformer import ModelConfig, Transformer

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
VOCAB = 512


def tokenizer_dir(out: Path) -> Path:
    """A byte-level BPE tokenizer of VOCAB tokens (glassbox's own trainer) on a few standard-library modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("textwrap.py", "string.py", "shlex.py")]
    train_bpe(texts, len(texts), VOCAB).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}))
    return out


def engine(tokenizer: Tokenizer, max_num_seqs: int, tokens: int) -> LLMEngine:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=128, max_seq_len=256)).eval()
    blocks = max_num_seqs * -(-(tokens + 64) // 16) + 16
    return LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                                                    num_kv_blocks=blocks),
                     eos_token_ids=[tokenizer.eos_token_id])


def timed_runner(eng: LLMEngine) -> list[float]:
    """Wraps the runner's execute so that each call's seconds are recorded."""
    spent: list[float] = []
    execute = eng.runner.execute

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return execute(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    eng.runner.execute = timed
    return spent


def one_run(eng: LLMEngine, spent: list[float], batch: int, tokens: int, sampling: str, tag: str) -> dict:
    """`batch` requests of 16-token prompts admitted at once, decoded to `tokens` each; the steps after the
    prefill (all `batch` sequences decoding) are the ones counted."""
    for i in range(batch):
        if sampling == "greedy":
            params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=tokens, ignore_eos=True, seed=i)
        eng.add_request(f"{tag}-{i}", [1 + (i * 7 + j) % (VOCAB - 2) for j in range(16)], params)
    walls, models = [], []
    while eng.has_unfinished():
        running = len(eng.scheduler.running)
        before = len(spent)
        started = time.perf_counter()
        eng.step()
        wall = time.perf_counter() - started
        if running == batch and len(spent) == before + 1:       # a decode step of the whole batch
            walls.append(wall)
            models.append(spent[-1])
    host = [w - m for w, m in zip(walls, models)]
    return {"steps": len(walls), "host_ms_per_step": 1e3 * statistics.median(host),
            "model_ms_per_step": 1e3 * statistics.median(models), "wall_ms_per_step": 1e3 * statistics.median(walls)}


def machine() -> str:
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-name", default="engine_host_overhead_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)        # the host work is single-threaded Python; so is a GPU engine's
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer(tokenizer_dir(Path(tmp)))
        for batch in args.batches:
            eng = engine(tokenizer, batch, args.tokens)
            spent = timed_runner(eng)
            one_run(eng, spent, batch, 8, "greedy", "warm-up")
            for sampling in ("greedy", "top_p"):
                runs = [one_run(eng, spent, batch, args.tokens, sampling, f"{sampling}-{r}")
                        for r in range(args.rounds)]
                row = {"batch": batch, "sampling": sampling, "steps": runs[0]["steps"]}
                for key in ("host_ms_per_step", "model_ms_per_step", "wall_ms_per_step"):
                    row[key] = statistics.median(r[key] for r in runs)
                row["host_us_per_seq_step"] = 1e3 * row["host_ms_per_step"] / batch
                # Per run, then the median: a shared machine's speed drifts between runs, and the model's time
                # drifts with the host's, so the ratio compares runs that the absolute times cannot.
                row["host_to_model"] = statistics.median(r["host_ms_per_step"] / r["model_ms_per_step"] for r in runs)
                rows.append(row)
                print(f"batch {batch:4d} {sampling:6s}: host {row['host_ms_per_step']:.3f} ms/step "
                      f"({row['host_us_per_seq_step']:.1f} us a sequence), model {row['model_ms_per_step']:.3f} ms",
                      flush=True)
            eng.close()

    def pick(batch: int, sampling: str, key: str) -> float | None:
        return next((r[key] for r in rows if r["batch"] == batch and r["sampling"] == sampling), None)

    summary = {"host_us_per_seq_step_b256": pick(256, "greedy", "host_us_per_seq_step"),
               "host_us_per_seq_step_b256_top_p": pick(256, "top_p", "host_us_per_seq_step"),
               "host_ms_per_step_b1": pick(1, "greedy", "host_ms_per_step"),
               "host_ms_per_step_b32": pick(32, "greedy", "host_ms_per_step")}
    result = {"summary": summary, "machine": machine(), "tokens": args.tokens, "rounds": args.rounds, "rows": rows,
              "load_average": os.getloadavg()[0]}
    lines = [f"# Engine host time per step: {machine()}", "",
             f"Tiny model (2 layers, hidden 64, vocab {VOCAB}), every request decoding {args.tokens} tokens with EOS "
             f"ignored; decode steps of the whole batch; medians of {args.rounds} runs; load average "
             f"{result['load_average']:.1f}. Host = step wall time - time in ModelRunner.execute.", "",
             "| batch | sampling | host ms/step | host us/sequence | model ms/step | wall ms/step | host / model |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['sampling']} | {r['host_ms_per_step']:.3f} | {r['host_us_per_seq_step']:.1f} | "
              f"{r['model_ms_per_step']:.3f} | {r['wall_ms_per_step']:.3f} | {r['host_to_model']:.3f} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out_name) if os.sep in args.out_name else RESULTS / args.out_name
    atomic.write_json(out.with_suffix(".json"), result)
    atomic.write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
