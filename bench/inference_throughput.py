"""Inference engine throughput and latency against transformers' `generate`, on the same model directory.

Two measurements, side by side in one process:

- offline throughput: B prompts of --prompt-len random tokens, each generating exactly --max-tokens tokens
  (EOS ignored), through `LLM.generate` and through transformers' `generate` (greedy, one padded-free batch of
  equal-length prompts, KV cache on). Output tokens/s = B x max_tokens / wall time; median of --repeats runs after
  a warm-up; ratio = engine / transformers. Batch sizes: --batch-sizes (default 1 8 32).
- online latency: --num-requests requests arriving as a Poisson process at each --rates (requests/s), prompt and
  output lengths drawn uniformly (prompt 0.5-1.5 x --prompt-len, output 0.5-1.5 x --max-tokens), driven straight
  into `LLMEngine` (no HTTP). TTFT = arrival -> first token, TPOT = mean gap between a request's later tokens;
  p50/p90/p99 over requests, plus achieved output tokens/s.

The model is --model-dir, or a random-init Llama written by transformers at the size --preset names ("cpu": ~7M
parameters, a few minutes on 2 cores; "gpu": ~350M parameters). Writes bench/results/inference_throughput.json
and .md (--out-name changes the file stem, e.g. to keep CPU and GPU results side by side).

    python bench/inference_throughput.py --threads 1                       # CPU, fp32
    python bench/inference_throughput.py --device cuda --out-name inference_throughput_h100   # bf16, preset gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glassbox.inference.engine import DTYPES, EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "cpu": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=512),
    "gpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
}


def make_model_dir(preset: str, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**PRESETS[preset], initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(fns: list, repeats: int, device: str) -> list[float]:
    """Median wall time of each function, the functions alternating within every repeat so that a change in the
    machine's load (shared CPUs) hits them alike."""
    for fn in fns:
        fn()                                # warm-up: allocator, kernels, CUDA graphs
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def bench_throughput(args, model_dir: Path, vocab: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[args.dtype]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=max(args.batch_sizes),
                       max_model_len=args.prompt_len + args.max_tokens + 1, enable_prefix_caching=False,
                       gpu_memory_utilization=args.gpu_memory_utilization, compile=args.compile)
    t0 = time.perf_counter()
    llm = LLM(engine=LLMEngine.from_model_dir(model_dir, cfg))
    args.engine_startup_s = time.perf_counter() - t0
    print(f"engine start-up (load, KV pool, graphs{', compile' if args.compile else ''}): "
          f"{args.engine_startup_s:.1f} s", flush=True)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(2, vocab, (B, args.prompt_len), generator=g)
        ids = prompts.to(args.device)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                  min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
            assert out.shape[1] == args.prompt_len + args.max_tokens

        def run_engine():
            outs = llm.generate(prompts.tolist(), params)
            assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outs)

        t_hf, t_engine = median_times([run_hf, run_engine], args.repeats, args.device)
        tokens = B * args.max_tokens
        rows.append({"batch": B, "engine_tok_s": tokens / t_engine, "transformers_tok_s": tokens / t_hf,
                     "ratio": t_hf / t_engine})
        print(f"batch {B:3d}: engine {tokens / t_engine:9.1f} tok/s  transformers {tokens / t_hf:9.1f} tok/s  "
              f"x{t_hf / t_engine:.2f}", flush=True)
    return rows


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def draw_request(rng: random.Random, args, vocab: int) -> tuple[list[int], int]:
    """A random prompt and output length, each uniform in 0.5-1.5x its --prompt-len / --max-tokens."""
    plen = rng.randint(args.prompt_len // 2, args.prompt_len * 3 // 2)
    olen = rng.randint(max(1, args.max_tokens // 2), args.max_tokens * 3 // 2)
    return [rng.randrange(2, vocab) for _ in range(plen)], olen


def poisson_arrivals(rng: random.Random, rate: float, args, vocab: int) -> list[tuple[float, str, list[int], int]]:
    """--num-requests requests (offset s, id, prompt, output length) arriving as a Poisson process at `rate`/s."""
    t, arrivals = 0.0, []
    for i in range(args.num_requests):
        t += rng.expovariate(rate)
        arrivals.append((t, f"r{i}", *draw_request(rng, args, vocab)))
    return arrivals


def drive(engine: LLMEngine, arrivals: list[tuple[float, str, list[int], int]],
          on_step=None) -> tuple[list, float]:
    """Add each request at its arrival time (greedy, EOS ignored) and step the engine until all are done; the
    finished outputs and the wall time. `on_step(engine)`, when given, runs before every step."""
    finished = []
    start = time.monotonic()
    pending = list(arrivals)
    while pending or engine.has_unfinished():
        now = time.monotonic() - start
        while pending and pending[0][0] <= now:
            at, rid, prompt, olen = pending.pop(0)
            engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True),
                               arrival_time=start + at)
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(pending[0][0] - now, 0.01)))
            continue
        if on_step is not None:
            on_step(engine)
        finished.extend(engine.step(unfinished_outputs=False))
    return finished, time.monotonic() - start


def bench_latency(args, model_dir: Path, vocab: int) -> list[dict]:
    max_len = int(1.5 * args.prompt_len) + int(1.5 * args.max_tokens) + 2
    cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=64, max_model_len=max_len,
                       gpu_memory_utilization=args.gpu_memory_utilization, compile=args.compile)
    engine = LLMEngine.from_model_dir(model_dir, cfg)
    # Warm up before the clock matters, with a burst of requests like the measured ones: one short request leaves
    # the many prefill shapes of mixed batches cold (allocator growth, first kernel loads), which on the H100 held
    # up the first second of the first rate.
    rng = random.Random(-1)
    for i in range(cfg.max_num_seqs):
        prompt, olen = draw_request(rng, args, vocab)
        engine.add_request(f"warm{i}", prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    rows = []
    for rate in args.rates:
        arrivals = poisson_arrivals(random.Random(int(rate * 1000)), rate, args, vocab)
        ttft, tpot, finished_tokens = [], [], 0
        outs, wall = drive(engine, arrivals)
        for out in outs:
            finished_tokens += len(out.outputs[0].token_ids)
            first, per_token = out.latency()
            ttft.append(first)
            if per_token is not None:
                tpot.append(per_token)
        row = {"rate": rate, "requests": len(ttft), "output_tok_s": finished_tokens / wall}
        for name, vals in (("ttft", ttft), ("tpot", tpot)):
            for q in (0.5, 0.9, 0.99):
                row[f"{name}_p{int(q * 100)}_ms"] = 1000 * percentile(vals, q)
        rows.append(row)
        print(f"rate {rate:6.1f}/s: TTFT p50 {row['ttft_p50_ms']:8.1f} ms p99 {row['ttft_p99_ms']:8.1f} ms  "
              f"TPOT p50 {row['tpot_p50_ms']:7.2f} ms p99 {row['tpot_p99_ms']:7.2f} ms  "
              f"{row['output_tok_s']:.0f} tok/s", flush=True)
    return rows


def write_results(args, result: dict) -> None:
    from glassbox.atomic import write_json, write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.out_name}.json", result)
    env = result["environment"]
    lines = [
        f"# Inference throughput ({env['device']}, {args.dtype}, model preset {result['model']})",
        "",
        f"Prompt {args.prompt_len} tokens, {args.max_tokens} generated tokens per request (EOS ignored), greedy; "
        f"median of {args.repeats} runs (the two alternating). torch {env['torch']}, {env['threads']} CPU threads. "
        f"Engine {'with' if args.compile else 'without'} `compile`; its start-up took {args.engine_startup_s:.0f} s; "
        "transformers runs eagerly, as `generate` does by default.",
        "",
        "| batch | glassbox engine tok/s | transformers generate tok/s | engine / transformers |",
        "|---:|---:|---:|---:|",
    ]
    for r in result["throughput"]:
        lines.append(f"| {r['batch']} | {r['engine_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x |")
    lines += [
        "",
        f"Poisson arrivals, {args.num_requests} requests per rate, prompts {args.prompt_len // 2}-"
        f"{args.prompt_len * 3 // 2} tokens, outputs {max(1, args.max_tokens // 2)}-{args.max_tokens * 3 // 2} "
        "tokens, after an unmeasured warm-up burst of 64 such requests.",
        "",
        "| rate (req/s) | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT p50 ms | TPOT p90 ms | TPOT p99 ms "
        "| output tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["latency"]:
        lines.append(f"| {r['rate']:g} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                     f"{r['tpot_p50_ms']:.2f} | {r['tpot_p90_ms']:.2f} | {r['tpot_p99_ms']:.2f} | "
                     f"{r['output_tok_s']:.0f} |")
    write_text(RESULTS / f"{args.out_name}.md", "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--model-dir", type=Path, default=None, help="a HF Llama/Mixtral directory (default: --preset)")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: cpu on CPU, gpu on CUDA")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    p.add_argument("--max-tokens", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rates", type=float, nargs="+", default=None, help="default: 2 4 8 on CPU, 8 32 128 on CUDA")
    p.add_argument("--num-requests", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="share of the GPU the engine may fill (KV pool included); transformers runs beside it")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="the engine's compile option (default auto: on with CUDA, where the decode graphs use it)")
    p.add_argument("--out-name", default="inference_throughput")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    args.prompt_len = args.prompt_len or (128 if cuda else 32)
    args.max_tokens = args.max_tokens or (128 if cuda else 32)
    args.rates = args.rates or ([8, 32, 128] if cuda else [2, 4, 8])
    args.num_requests = args.num_requests or (256 if cuda else 32)
    args.compile = args.compile == "on" or (args.compile == "auto" and cuda)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_model_dir(args.preset, Path(tmp) / "model")
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        throughput = bench_throughput(args, model_dir, vocab)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()          # the transformers model and the first engine are gone
        latency = bench_latency(args, model_dir, vocab)
    device = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    result = {
        "model": str(args.model_dir) if args.model_dir else args.preset,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version()},
        "throughput": throughput,
        "latency": latency,
    }
    write_results(args, result)


if __name__ == "__main__":
    main()
