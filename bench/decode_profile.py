"""Where a batch-1 decoding step's time goes: the kernels it runs on the card against the step's wall time.

serving_perf's roofline section measures a step's wall time against the bytes it must read; this bench says why a
step takes longer than that. Under torch.profiler (CUDA activity) one request decodes at batch 1 on the roofline's
random-weight Llama sizes, and the report splits each step into kernel time on the card (the sum of its kernels'
durations), the gaps between them (launch latency inside a graph, or the card waiting on the host), and the host's
share (wall minus the span the kernels cover), with the top kernels by time and the kernel count per step.

    python bench/decode_profile.py --device cuda --compile --out-name decode_profile_h200
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
from glassbox.inference.engine import DTYPES, LLMEngine
from glassbox.inference.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_perf as sp  # noqa: E402  (the roofline sizes and the machine's name)


def decode_steps(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[float]:
    """One request through the engine; the wall time of each decoding step (every step after the first token)."""
    engine.add_request("profiled", prompt, params)
    stamps = []
    while engine.has_unfinished():
        engine.step(unfinished_outputs=False)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def kernel_report(prof, steps: int, wall: float, top: int) -> dict:
    """Kernel time, span and count per step from the profiler's device events, and the top kernels."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return {"kernels_seen": 0}
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e6
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"kernels_seen": len(kernels), "kernels_per_step": len(kernels) / steps,
            "kernel_ms_per_step": 1e3 * busy / steps, "span_ms_per_step": 1e3 * span / steps,
            "wall_ms_per_step": 1e3 * wall / steps, "kernel_fraction_of_wall": busy / wall,
            "top_kernels": [{"name": n[:120], "calls_per_step": len(t) / steps, "us_per_call": statistics.median(t),
                             "ms_per_step": sum(t) / 1e3 / steps} for n, t in ranked]}


def top_kernels_table(label: str, kernels: list[dict], per: str = "step") -> list[str]:
    """Markdown lines of kernel_report's top kernels under "Top kernels, `label`:", counted per `per`."""
    lines = ["", f"Top kernels, {label}:", "", f"| kernel | calls/{per} | us/call | ms/{per} |", "|---|---:|---:|---:|"]
    return lines + [f"| `{k['name']}` | {k['calls_per_step']:.1f} | {k['us_per_call']:.1f} | {k['ms_per_step']:.3f} |"
                    for k in kernels]


def profile_size(args, size: str, bandwidth: float) -> dict:
    cfg, model, engine = sp.batch1_engine(args, size, piecewise_graphs=False)
    dtype = DTYPES[args.dtype]
    prompt = torch.randint(2, cfg.vocab_size, (args.prompt_len,)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    unprofiled = statistics.median(decode_steps(engine, prompt, params))     # warm, and the step without tracing
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        steps = decode_steps(engine, prompt, params)
        wall = time.perf_counter() - t0
    if args.device.startswith("cuda"):     # the profiler's own table too, in the log: a check on kernel_report
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=20), flush=True)
    elem = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * elem
    row = {"size": size, "step_ms_unprofiled": 1e3 * unprofiled, "step_ms_profiled": 1e3 * statistics.median(steps),
           "ideal_ms": 1e3 * weights / bandwidth, **kernel_report(prof, args.decode_tokens, wall, args.top)}
    print(f"profile {size}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
          flush=True)
    del engine, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--sizes", nargs="+", default=None, choices=list(sp.SIZES), help="default: tiny CPU, 1b 7b CUDA")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--graph-compile", default="per_size", choices=["per_size", "dynamic"])
    p.add_argument("--separate-projections", action="store_true",
                   help="Q/K/V and gate/up as separate products (EngineConfig.fuse_projections off)")
    p.add_argument("--top", type=int, default=15, help="kernels listed, by total time")
    p.add_argument("--out-name", default="decode_profile")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    sizes = args.sizes or (["1b", "7b"] if gpu else ["tiny"])
    bandwidth = sp.copy_bandwidth(args.device)
    result = {"machine": sp.machine(args.device), "settings": vars(args), "bandwidth_gb_s": bandwidth / 1e9,
              "sizes": [profile_size(args, s, bandwidth) for s in sizes]}
    result["summary"] = {f"kernel_fraction_of_wall_{r['size']}": r.get("kernel_fraction_of_wall")
                         for r in result["sizes"]}
    RESULTS.mkdir(exist_ok=True)
    atomic.write_json(RESULTS / f"{args.out_name}.json", result)
    lines = [f"# Batch-1 decode profile: {result['machine']}, {args.dtype}, compile {args.compile}, projections "
             f"{'separate' if args.separate_projections else 'fused'}", "",
             "| size | wall ms/step | kernels ms/step | span ms/step | kernels/step | ideal ms | kernels / wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["sizes"]:
        if r.get("kernels_seen"):
            lines.append(f"| {r['size']} | {r['wall_ms_per_step']:.3f} | {r['kernel_ms_per_step']:.3f} | "
                         f"{r['span_ms_per_step']:.3f} | {r['kernels_per_step']:.0f} | {r['ideal_ms']:.3f} | "
                         f"{r['kernel_fraction_of_wall']:.1%} |")
    for r in result["sizes"]:
        lines += top_kernels_table(r["size"], r.get("top_kernels", []))
    atomic.write_text(RESULTS / f"{args.out_name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
