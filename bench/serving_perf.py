"""Serving performance: start-up cold and warm, the HBM roofline at batch 1, load vs decode, and the ratios to
transformers.

Four measurements, each its own section of bench/results/<out-name>.json; its `summary` always carries the eight
keys the serving issue names (null for a section not run), so one run of the default sections answers it all:

- start-up: two fresh processes start the engine with `compile` on the same model, the first with an empty
  compile cache (cold), the second with the entry the first wrote (warm); each has its own empty inductor folder,
  so the warm start can only be warm through glassbox's cache. Seconds from process start to the engine ready,
  and the graphs inductor had to build (0 when warm).
- roofline at batch 1: one request decoding, random weights at the --roofline-sizes (glassbox Transformers
  built straight on the device, no files), its median decode step time; the bytes a step must read (every
  weight but the embedding table, plus the KV of the context) over that time, as a fraction of the card's
  bandwidth measured in the same run by a large device-to-device copy.
- load vs decode: under Poisson arrivals at --load-rate, the achieved output tok/s beside the offered rate
  (what the arrivals ask for), TTFT p50, and the mean number of running sequences; then the pure decode rate at
  that concurrency (that many sequences decoding together, prefill excluded). The batch cap must hold the load:
  at 128 req/s of ~128 output tokens the steady state runs ~128 x latency sequences, which a cap of 64 cannot
  hold (the queue then grows for the whole run and TTFT measures it, not the engine), hence 256 on CUDA. The fraction is load / pure decode. With several --attention modes (`auto`: the
  varlen kernel where the runner has it; `dense`: the masked path; either with `+piecewise`: steps with prompts
  replayed as graphs cut at attention), one run each, the first giving the summary.
- ratios: output tok/s of the engine over transformers' greedy `generate` at --ratio-batch-sizes (summary:
  batch 1 and 32), on the model directory start-up and load use, measured by bench/inference_throughput.py's
  own function (same prompts, alternating medians), so its tables and this summary are one method. The engine
  compiles on CUDA (--ratio-compile auto), as inference_throughput's does.

    python bench/serving_perf.py --device cpu --out-name serving_perf_cpu       # small sizes, minutes
    python bench/serving_perf.py --device cuda --out-name serving_perf_h200     # 350M start-up, 1B and 7B roofline
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
import tempfile
import time
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.inference.engine import DTYPES, EngineConfig, LLMEngine
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.transformer import ModelConfig, Transformer

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_throughput as it  # noqa: E402  (the model presets and the random model directory)

# Llama-shaped sizes for the roofline (random weights): name -> ModelConfig fields.
SIZES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               intermediate_size=5632),
    "7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               intermediate_size=11008),
}

STARTUP_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from glassbox.inference.engine import EngineConfig, LLMEngine
cfg = EngineConfig(device=sys.argv[2], dtype=sys.argv[3], compile=True, compile_cache_dir=sys.argv[4],
                   max_num_seqs=int(sys.argv[5]), max_model_len=int(sys.argv[6]), gpu_memory_utilization=0.4,
                   graph_compile=sys.argv[7])
engine = LLMEngine.from_model_dir(sys.argv[1], cfg)
s = engine.startup
print(json.dumps({"seconds": time.perf_counter() - t0, "runner_seconds": s.seconds, "cache": s.compile_cache,
                  "compiled_graphs": s.compiled_graphs}))
"""


def machine(device: str) -> str:
    """The device as the results name it, so a JSON or table says where its numbers came from."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"{platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def bench_startup(args, model_dir: Path, work: Path) -> dict:
    rows = {}
    for name in ("cold", "warm"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor_{name}")}
        cmd = [sys.executable, "-c", STARTUP_SCRIPT, str(model_dir), args.device, args.dtype, str(work / "cache"),
               str(args.max_num_seqs), str(args.max_model_len), args.graph_compile]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"start-up ({name}) failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"start-up {name}: {rows[name]}", flush=True)
    return rows


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large on-device copy (read + write), median of 10."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        it.sync(device)
        t = time.perf_counter()
        y.copy_(x)
        it.sync(device)
        times.append(time.perf_counter() - t)
    del x, y
    return 2 * n / statistics.median(times[2:])


def batch1_engine(args, size: str, **engine_options) -> tuple[ModelConfig, Transformer, LLMEngine]:
    """A random-weight model of `size` in an engine for one sequence of prompt_len + decode_tokens (the roofline's
    and bench/decode_profile.py's), compile, graph_compile and projections as the arguments say."""
    cfg = ModelConfig(**SIZES[size], max_seq_len=args.prompt_len + args.decode_tokens + 8, tie_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(cfg).to(DTYPES[args.dtype]).eval()
    engine = LLMEngine(model, None, EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=1,
                                                 num_kv_blocks=-(-cfg.max_seq_len // 16) + 1, compile=args.compile,
                                                 graph_compile=args.graph_compile,
                                                 fuse_projections=not args.separate_projections, **engine_options))
    return cfg, model, engine


def bench_roofline(args, size: str, bandwidth: float) -> dict:
    cfg, model, engine = batch1_engine(args, size)
    dtype = DTYPES[args.dtype]
    prompt = torch.randint(2, cfg.vocab_size, (args.prompt_len,)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    tpots = []
    for i in range(3):
        engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished():
            for out in engine.step(unfinished_outputs=False):
                tpots.append(out.latency()[1])
    step = statistics.median(tpots[1:])
    elem = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * elem
    context = args.prompt_len + args.decode_tokens / 2
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem * context
    row = {"size": size, "params": sum(p.numel() for p in model.parameters()), "step_ms": 1e3 * step,
           "bytes_per_step": weights + kv, "achieved_gb_s": (weights + kv) / step / 1e9,
           "roofline_fraction": (weights + kv) / step / bandwidth}
    print(f"roofline {size}: {row}", flush=True)
    del engine, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def bench_load(args, model_dir: Path, vocab: int, attention: str) -> dict:
    """Poisson load at --load-rate, then pure decoding at the concurrency the load reached; eager steps attend
    through `attention` (a runner mode of glassbox.inference.attention), as piecewise graphs with a `+piecewise`
    suffix (glassbox.inference.piecewise)."""
    mode, _, pieces = attention.partition("+")
    cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, gpu_memory_utilization=0.4, compile=args.compile,
                       piecewise_graphs=pieces == "piecewise", graph_compile=args.graph_compile)
    engine = LLMEngine.from_model_dir(model_dir, cfg)
    if mode != "auto":
        engine.runner = engine.runner.replaced(attention=mode)
    rng = random.Random(7)
    draw = lambda: it.draw_request(rng, args, vocab)           # noqa: E731
    arrivals = it.poisson_arrivals(rng, args.load_rate, args, vocab)
    for i in range(min(8, args.max_num_seqs)):                  # warm-up, unmeasured
        prompt, olen = draw()
        engine.add_request(f"w{i}", prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    running: list[int] = []
    outs, wall = it.drive(engine, arrivals, on_step=lambda e: running.append(len(e.scheduler.running)))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    offered = sum(a[3] for a in arrivals) / arrivals[-1][0]      # output tok/s the arrivals ask for
    ttft = [o.latency()[0] for o in outs]
    concurrency = max(1, round(statistics.mean(running)))
    # Pure decoding at that concurrency: every sequence prefilled first, then only decode steps are timed.
    for i in range(concurrency):
        prompt, _ = draw()
        engine.add_request(f"d{i}", prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                             ignore_eos=True))
    while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    it.sync(args.device)
    t0, decoded = time.perf_counter(), 0
    while engine.has_unfinished():
        decoded += len(engine.scheduler.running)
        engine.step(unfinished_outputs=False)
    it.sync(args.device)
    decode_tok_s = decoded / (time.perf_counter() - t0)
    row = {"attention": attention, "varlen": engine.runner.varlen is not None, "rate": args.load_rate,
           "requests": len(ttft), "output_tok_s": tokens / wall, "offered_tok_s": offered,
           "max_num_seqs": args.max_num_seqs,
           "ttft_p50_ms": 1e3 * it.percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * it.percentile(ttft, 0.99),
           "mean_running": statistics.mean(running), "decode_tok_s_at_concurrency": decode_tok_s,
           "fraction_of_decode": tokens / wall / decode_tok_s}
    print(f"load: {row}", flush=True)
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def bench_ratios(args, model_dir: Path, vocab: int) -> dict:
    """Engine vs transformers' `generate` at args.ratio_batch_sizes through inference_throughput.bench_throughput,
    so the ratio here is measured exactly as that script's tables are (greedy, EOS ignored, equal-length random
    prompts of args.prompt_len, args.max_tokens new tokens, median of args.ratio_repeats alternating runs)."""
    opts = argparse.Namespace(device=args.device, dtype=args.dtype, batch_sizes=list(args.ratio_batch_sizes),
                              prompt_len=args.prompt_len, max_tokens=args.max_tokens, repeats=args.ratio_repeats,
                              gpu_memory_utilization=0.4, compile=args.ratio_compile)
    rows = it.bench_throughput(opts, model_dir, vocab)
    gc.collect()                      # the transformers model and the engine are gone: give their memory back
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"batch_sizes": opts.batch_sizes, "prompt_len": opts.prompt_len, "max_tokens": opts.max_tokens,
            "repeats": opts.repeats, "compile": opts.compile, "engine_startup_s": opts.engine_startup_s, "rows": rows}


def ratio_summary(ratios: dict | None) -> dict[str, float | None]:
    """The issue's ratio_b1 / ratio_b32 from a ratios section (None where that batch size was not measured)."""
    by_batch = {r["batch"]: round(r["ratio"], 2) for r in (ratios or {}).get("rows", [])}
    return {"ratio_b1": by_batch.get(1), "ratio_b32": by_batch.get(32)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--sections", nargs="+", default=["startup", "roofline", "load", "ratios"],
                   choices=["startup", "roofline", "load", "ratios"])
    p.add_argument("--roofline-sizes", nargs="+", default=None, choices=list(SIZES),
                   help="default: tiny on CPU, 1b 7b on CUDA")
    p.add_argument("--prompt-len", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    p.add_argument("--max-tokens", type=int, default=None, help="load outputs (default: 16 CPU, 128 CUDA)")
    p.add_argument("--decode-tokens", type=int, default=None, help="roofline decode steps (default: 16 CPU, 128 CUDA)")
    p.add_argument("--load-rate", type=float, default=None, help="req/s (default: 4 on CPU, 128 on CUDA)")
    p.add_argument("--num-requests", type=int, default=None, help="default: 16 on CPU, 512 on CUDA")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 8 on CPU, 256 on CUDA")
    p.add_argument("--compile", action="store_true", help="roofline and load with compile (start-up always is)")
    p.add_argument("--graph-compile", default="per_size", choices=["per_size", "dynamic"],
                   help="how compile compiles the decode graphs' layer (EngineConfig.graph_compile), every section")
    p.add_argument("--separate-projections", action="store_true",
                   help="roofline: Q/K/V and gate/up as separate products (EngineConfig.fuse_projections off)")
    modes = ["auto", "dense", "varlen", "reference"]
    p.add_argument("--attention", nargs="+", default=["auto"], choices=modes + [f"{m}+piecewise" for m in modes],
                   help="load runs, one per runner attention mode, `+piecewise` for piecewise graphs (the first "
                        "gives the summary)")
    p.add_argument("--ratio-batch-sizes", type=int, nargs="+", default=[1, 32],
                   help="ratios: batch sizes against transformers (the summary takes 1 and 32)")
    p.add_argument("--ratio-repeats", type=int, default=3, help="ratios: timed runs each, the median kept")
    p.add_argument("--ratio-compile", choices=["auto", "on", "off"], default="auto",
                   help="ratios: the engine's compile (default auto: on with CUDA, as inference_throughput's)")
    p.add_argument("--out-name", default="serving_perf")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.prompt_len = args.prompt_len or (128 if gpu else 32)
    args.max_tokens = args.max_tokens or (128 if gpu else 16)
    args.decode_tokens = args.decode_tokens or (128 if gpu else 16)
    args.load_rate = args.load_rate or (128.0 if gpu else 4.0)
    args.num_requests = args.num_requests or (512 if gpu else 16)
    args.max_num_seqs = args.max_num_seqs or (256 if gpu else 8)
    args.ratio_compile = args.ratio_compile == "on" or (args.ratio_compile == "auto" and gpu)
    args.max_model_len = int(1.5 * args.prompt_len) + int(1.5 * args.max_tokens) + 2
    sizes = args.roofline_sizes or (["1b", "7b"] if gpu else ["tiny"])
    if not gpu:
        torch.set_num_threads(1)
    result: dict = {"machine": machine(args.device), "device": args.device, "dtype": args.dtype,
                    "preset": "gpu" if gpu else "cpu", "settings": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = it.make_model_dir(result["preset"], work / "model")
        vocab = it.PRESETS[result["preset"]]["vocab_size"]
        if "startup" in args.sections:
            result["startup"] = bench_startup(args, model_dir, work)
        if "roofline" in args.sections:
            result["bandwidth_gb_s"] = copy_bandwidth(args.device) / 1e9
            print(f"copy bandwidth: {result['bandwidth_gb_s']:.0f} GB/s", flush=True)
            result["roofline"] = [bench_roofline(args, s, result["bandwidth_gb_s"] * 1e9) for s in sizes]
        if "load" in args.sections:
            result["load_by_attention"] = [bench_load(args, model_dir, vocab, mode) for mode in args.attention]
            result["load"] = result["load_by_attention"][0]
        if "ratios" in args.sections:         # last: transformers' copy must not shrink the other engines' KV pools
            result["ratios"] = bench_ratios(args, model_dir, vocab)
    roof = {r["size"]: round(r["roofline_fraction"], 3) for r in result.get("roofline", [])}
    others = result.get("load_by_attention", [])[1:]
    result["summary"] = {
        "startup_cold_s": round(result["startup"]["cold"]["seconds"], 1) if "startup" in result else None,
        "startup_warm_s": round(result["startup"]["warm"]["seconds"], 1) if "startup" in result else None,
        "load128_fraction_of_decode": round(result["load"]["fraction_of_decode"], 3) if "load" in result else None,
        "ttft_p50_ms_128": round(result["load"]["ttft_p50_ms"], 1) if "load" in result else None,
        "roofline_b1_1b": roof.get("1b"), "roofline_b1_7b": roof.get("7b"),
        **ratio_summary(result.get("ratios")),
        # The further attention modes' load runs, beside the first's (the summary names above).
        **{f"load128_fraction_of_decode_{r['attention']}": round(r["fraction_of_decode"], 3) for r in others},
        **{f"ttft_p50_ms_128_{r['attention']}": round(r["ttft_p50_ms"], 1) for r in others},
    }
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / f"{args.out_name}.json", json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# Serving performance: {result['machine']}, {args.dtype}", ""]
    if "startup" in result:
        s = result["startup"]
        mode = result["settings"].get("graph_compile", "per_size")
        lines += [f"Start-up of the {result['preset']}-preset model with compile (decode graphs {mode}), fresh "
                  f"processes: cold "
                  f"{s['cold']['seconds']:.1f} s ({s['cold']['compiled_graphs']} graphs built), warm "
                  f"{s['warm']['seconds']:.1f} s ({s['warm']['compiled_graphs']} built, cache {s['warm']['cache']}).", ""]
    if "roofline" in result:
        lines += [f"Batch-1 decoding against the measured copy bandwidth ({result['bandwidth_gb_s']:.0f} GB/s):", "",
                  "| size | params | step ms | bytes/step | GB/s | roofline |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['step_ms']:.2f} | {r['bytes_per_step'] / 1e9:.2f} GB | "
                  f"{r['achieved_gb_s']:.0f} | {r['roofline_fraction']:.1%} |" for r in result["roofline"]]
        lines.append("")
    for r in result.get("load_by_attention", []):
        path = ("varlen kernel" if r["varlen"] else "dense masked path") + (
            ", piecewise graphs" if r["attention"].endswith("+piecewise") else "")
        lines += [f"Poisson load at {r['rate']:g} req/s ({r['requests']} requests), attention {r['attention']} "
                  f"({path}, cap {r['max_num_seqs']} sequences): {r['output_tok_s']:.0f} output tok/s of "
                  f"{r['offered_tok_s']:.0f} offered, "
                  f"TTFT p50 {r['ttft_p50_ms']:.1f} ms / p99 {r['ttft_p99_ms']:.1f} ms, {r['mean_running']:.1f} "
                  f"sequences running on average; pure decoding at that concurrency: "
                  f"{r['decode_tok_s_at_concurrency']:.0f} tok/s; load / decode = {r['fraction_of_decode']:.1%}.", ""]
    if "ratios" in result:
        r = result["ratios"]
        lines += [f"Engine vs transformers' greedy `generate` on the same {result['preset']}-preset model (prompt "
                  f"{r['prompt_len']}, {r['max_tokens']} new tokens, EOS ignored; median of {r['repeats']} alternating "
                  f"runs; engine {'with' if r['compile'] else 'without'} `compile`, start-up "
                  f"{r['engine_startup_s']:.1f} s):", "",
                  "| batch | engine tok/s | transformers tok/s | engine / transformers |", "|---:|---:|---:|---:|"]
        lines += [f"| {b['batch']} | {b['engine_tok_s']:.1f} | {b['transformers_tok_s']:.1f} | {b['ratio']:.2f}x |"
                  for b in r["rows"]]
        lines.append("")
    atomic.write_text(RESULTS / f"{args.out_name}.md", "\n".join(lines) + "\n")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
