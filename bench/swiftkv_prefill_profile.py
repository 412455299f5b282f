"""Where a SwiftKV prefill's time goes, beside the base model's: kernels on the card against the time to first token.

bench/swiftkv.py times one request's prefill (TTFT) of the 410M random-init Llama and its SwiftKV form at l = L/2:
on the H200 with piecewise graphs (bench/results/swiftkv.md) 19.3 against 14.6 ms at 4096 tokens, 1.32x, where
the counted FLOPs are 0.52x; at 1024 tokens 7.5 against 7.7 ms, no gain at all. A line through its four lengths
puts a fixed ~2.8 ms under the base model's TTFT and ~4.8 ms under SwiftKV's, and SwiftKV's per-token slope at
0.61x the base's. This bench says which kernels (or which gaps between them) make up the difference: the same
engines (bench/swiftkv.py's prefill_engine and time_prefill_on), one --prompt-len prefill repeated under
torch.profiler, kernel time, span and count per prefill, the top kernels, and the top host operators by their own
time. On a CPU there are no kernels: the host operators alone (a smoke run).

    python bench/swiftkv_prefill_profile.py --device cuda --piecewise    # bench/results/swiftkv_prefill_profile.*
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from glassbox import atomic
from glassbox.models.transformer import ModelConfig, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import swiftkv as skv  # noqa: E402  (the prefill model, its SwiftKV variants and the TTFT engine)
from decode_profile import kernel_report, top_kernels_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("base", "l=L/2")


def host_ops(prof, runs: int, top: int) -> list[dict]:
    """The operators with the most host time of their own, per prefill."""
    ranked = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"name": e.key[:100], "calls_per_prefill": e.count / runs,
             "host_ms_per_prefill": e.self_cpu_time_total / 1e3 / runs} for e in ranked]


def profile_model(name: str, model: Transformer, args) -> dict:
    engine = skv.prefill_engine(model, args, args.prompt_len)
    skv.time_prefill_on(engine, args, args.prompt_len)
    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_len,)).tolist()
    for _ in range(2):
        skv.run_one(engine, prompt)                         # warm-up at this shape
    ttft = statistics.median(skv.run_one(engine, prompt) for _ in range(args.repeats))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            skv.run_one(engine, prompt)
        wall = time.perf_counter() - t0
    if args.device.startswith("cuda"):      # the profiler's own table too, in the log: a check on kernel_report
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=20), flush=True)
    row = {"model": name, "ttft_ms_unprofiled": 1e3 * ttft, **kernel_report(prof, args.repeats, wall, args.top),
           "host_ops": host_ops(prof, args.repeats, args.top)}
    print(f"{name}: TTFT {1e3 * ttft:.2f} ms unprofiled, " +
          ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    del engine
    skv.free(args.device)
    return row


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# SwiftKV prefill profile: {result['machine']}, {s['dtype']}, {s['prompt_len']} prompt tokens, "
             f"piecewise graphs {s['piecewise']}", "",
             f"Model: {result['model']['num_layers']} layers, hidden {result['model']['hidden_size']}; one request's "
             f"prefill (max_tokens 1) repeated {s['repeats']} times under the profiler; per prefill.", "",
             "| model | TTFT ms (unprofiled) | wall ms (profiled) | kernels ms | span ms | kernels | kernels / wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["models"]:
        if r.get("kernels_seen"):
            lines.append(f"| {r['model']} | {r['ttft_ms_unprofiled']:.2f} | {r['wall_ms_per_step']:.2f} | "
                         f"{r['kernel_ms_per_step']:.2f} | {r['span_ms_per_step']:.2f} | {r['kernels_per_step']:.0f} | "
                         f"{r['kernel_fraction_of_wall']:.1%} |")
        else:
            lines.append(f"| {r['model']} | {r['ttft_ms_unprofiled']:.2f} | - | - | - | - | - |")
    for r in result["models"]:
        if r.get("top_kernels"):
            lines += top_kernels_table(r["model"], r["top_kernels"], per="prefill")
        lines += ["", f"Top host operators (own time), {r['model']}:", "", "| operator | calls | host ms |",
                  "|---|---:|---:|"]
        lines += [f"| `{o['name']}` | {o['calls_per_prefill']:.1f} | {o['host_ms_per_prefill']:.3f} |"
                  for o in r["host_ops"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=None, help="default: 4096 on CUDA, 512 on CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--piecewise", action="store_true", help="prompt steps as piecewise graphs (as swiftkv.md's runs)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out-name", default="swiftkv_prefill_profile")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = "bfloat16" if cuda else "float32"
    args.prompt_len = args.prompt_len or (4096 if cuda else 512)
    shape = skv.PRESETS["gpu" if cuda else "cpu"]
    torch.manual_seed(0)
    with torch.device(args.device):
        base = Transformer(ModelConfig(**shape)).to(torch.bfloat16 if cuda else torch.float32).eval()
    models = skv.variants(base)
    result = {"machine": skv.machine_name(args), "settings": vars(args), "model": shape,
              "models": [profile_model(name, models[name], args) for name in MODELS]}
    by = {r["model"]: r for r in result["models"]}
    ratio = by["l=L/2"]["ttft_ms_unprofiled"] / by["base"]["ttft_ms_unprofiled"]
    result["summary"] = {"ttft_ratio": ratio,
                         "kernel_ms_ratio": (by["l=L/2"]["kernel_ms_per_step"] / by["base"]["kernel_ms_per_step"]
                                             if cuda else None),
                         "prompt_len": args.prompt_len}
    RESULTS.mkdir(exist_ok=True)
    atomic.write_json(RESULTS / f"{args.out_name}.json", result)
    atomic.write_text(RESULTS / f"{args.out_name}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
