"""Mixed and prefill steps: the dense masked attention path against the varlen path, side by side on one model.

Two engines share one random-weight model (Llama-shaped: the 350M preset on CUDA, a 4-layer one on CPU); one's
runner attends its eager steps through the dense path (sequences padded to the longest, a boolean mask, SDPA's
math kernel), the other's through the varlen kernel (glassbox.inference.attention: FlashAttention's varlen on
CUDA; on a CPU the plain-torch reference, so CPU figures say what the layout and host work cost, not what the
flash kernel gains). Measurements alternate between the two within every repeat.

- ttft: one prompt alone at each --prompt-lens, chunked at --budget tokens a step (the engine's default 2048),
  so that prompts longer than the budget continue from cached chunks; time from adding it to its first token.
- mixed: --decodes sequences decoding at context --context; one step with them and new prompts (one of each
  --mixed-prompts length; --several of different lengths; the second chunk of a prompt twice the budget), against
  a pure decode step of the same sequences (a CUDA graph replay on CUDA): mixed / decode is what a step that
  admits requests costs. The summary's mixed_step_speedup is the several-prompts shape's.
- host: the runner's prepare() (per-step index building) in those mixed steps.

    python bench/mixed_steps.py --device cpu --out-name mixed_steps_cpu        # tiny model, about a minute
    python bench/mixed_steps.py --device cuda --out-name mixed_steps_h200      # 350M preset, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.inference.engine import DTYPES, EngineConfig, LLMEngine
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.transformer import ModelConfig, Transformer

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_perf import SIZES, machine  # noqa: E402

MODELS = {
    "cpu": SIZES["tiny"],
    "gpu": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=4,
                intermediate_size=2816),
}


class TimedPrepare:
    """The runner's prepare(), timing each call (host work per step)."""

    def __init__(self, prepare):
        self.prepare, self.seconds = prepare, []

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.prepare(*args)
        self.seconds.append(time.perf_counter() - t)
        return out


def build_engines(args, model: Transformer) -> dict[str, LLMEngine]:
    """One engine per attention mode over the same weights; the second mode is the varlen one."""
    longest = max(args.prompt_lens + [args.context + 64 + max(args.mixed_prompts), 2 * args.budget])
    blocks = -(-(longest + 16) // 16) * 2 + -(-(args.context + 256) // 16) * (args.decodes + 2)
    engines = {}
    for mode in ("dense", args.varlen_mode):
        cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=args.decodes + 8,
                           max_num_batched_tokens=args.budget, max_model_len=longest + 8, num_kv_blocks=blocks,
                           enable_prefix_caching=False, compile=args.compile)
        engine = LLMEngine(model, config=cfg)
        if mode != "auto":
            engine.runner = engine.runner.replaced(attention=mode)
        engines[mode] = engine
    runner = engines[args.varlen_mode].runner
    if runner.varlen is None:
        raise SystemExit(f"the {args.varlen_mode} runner fell back to the dense path (see the warning above)")
    return engines


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompt(rng: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=rng).tolist()


def time_to_first_token(engine: LLMEngine, ids: list[int], device: str) -> float:
    engine.add_request(f"p{time.monotonic_ns()}", ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    sync(device)
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step(unfinished_outputs=False)
    sync(device)
    return time.perf_counter() - t


def bench_ttft(args, engines: dict[str, LLMEngine], vocab: int) -> list[dict]:
    rng = torch.Generator().manual_seed(1)
    rows = []
    for n in args.prompt_lens:
        times: dict[str, list[float]] = {m: [] for m in engines}
        for rep in range(args.repeats + 1):
            ids = prompt(rng, n, vocab)
            for mode, engine in engines.items():
                t = time_to_first_token(engine, ids, args.device)
                if rep:                                          # the first is a warm-up at this shape
                    times[mode].append(t)
        row = {"prompt_len": n, "chunks": -(-n // args.budget),
               **{f"ttft_ms_{m}": 1e3 * statistics.median(v) for m, v in times.items()}}
        row["speedup"] = row["ttft_ms_dense"] / row[f"ttft_ms_{args.varlen_mode}"]
        print(f"ttft: {row}", flush=True)
        rows.append(row)
    return rows


def start_decodes(engine: LLMEngine, args, vocab: int) -> None:
    rng = torch.Generator().manual_seed(2)
    for i in range(args.decodes):
        engine.add_request(f"d{i}", prompt(rng, args.context, vocab),
                           SamplingParams(temperature=0, max_tokens=engine.max_model_len - args.context,
                                          ignore_eos=True))
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step(unfinished_outputs=False)


def timed_step(engine: LLMEngine, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    engine.step(unfinished_outputs=False)
    sync(device)
    return time.perf_counter() - t


def bench_mixed(args, engines: dict[str, LLMEngine], vocab: int) -> list[dict]:
    """Per shape: a pure decode step, then a step with the shape's prompts (one output token each, so they
    leave after it), alternating; the decodes run on throughout. Shapes: one prompt of each --mixed-prompts
    length (fresh: the dense path's causal SDPA), --several prompts together (their lengths differ: its masked
    path), and the second chunk of a prompt of twice the budget (a continuation: masked too)."""
    rng = torch.Generator().manual_seed(3)
    for engine in engines.values():
        start_decodes(engine, args, vocab)
    shapes = [("one", [p], 0) for p in args.mixed_prompts] + [("several", args.several, 0),
                                                             ("continuation", [2 * args.budget], 1)]
    rows = []
    for kind, lens, skip in shapes:
        decode: dict[str, list[float]] = {m: [] for m in engines}
        mixed: dict[str, list[float]] = {m: [] for m in engines}
        host: dict[str, list[float]] = {m: [] for m in engines}
        for rep in range(args.repeats + 1):
            prompts = [prompt(rng, n, vocab) for n in lens]
            for mode, engine in engines.items():
                d = timed_step(engine, args.device)
                for j, ids in enumerate(prompts):
                    engine.add_request(f"m{rep}-{j}-{time.monotonic_ns()}", ids,
                                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
                for _ in range(skip):                            # earlier chunks, untimed
                    engine.step(unfinished_outputs=False)
                timer = engine.runner.prepare = TimedPrepare(engine.runner.prepare)
                m = timed_step(engine, args.device)
                engine.runner.prepare = timer.prepare
                while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
                    engine.step(unfinished_outputs=False)        # what the budget left of the prompts
                if rep:
                    decode[mode].append(d)
                    mixed[mode].append(m)
                    host[mode].append(timer.seconds[0])
        row = {"shape": kind, "prompts": lens, "decodes": args.decodes, "context": args.context}
        for mode in engines:
            row[f"decode_ms_{mode}"] = 1e3 * statistics.median(decode[mode])
            row[f"mixed_ms_{mode}"] = 1e3 * statistics.median(mixed[mode])
            row[f"mixed_over_decode_{mode}"] = row[f"mixed_ms_{mode}"] / row[f"decode_ms_{mode}"]
            row[f"prepare_ms_{mode}"] = 1e3 * statistics.median(host[mode])
        row["speedup"] = row["mixed_ms_dense"] / row[f"mixed_ms_{args.varlen_mode}"]
        print(f"mixed: {row}", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=None,
                   help="ttft prompts (default: 128 512 1024 on CPU, 1024 2048 4096 8192 on CUDA)")
    p.add_argument("--budget", type=int, default=None, help="tokens a step (default: 256 on CPU, 2048 on CUDA)")
    p.add_argument("--decodes", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    p.add_argument("--context", type=int, default=None, help="decodes' context (default: 128 on CPU, 512 on CUDA)")
    p.add_argument("--mixed-prompts", type=int, nargs="+", default=None,
                   help="one prompt of each length beside the decodes (default: 32 128 on CPU, 128 512 1536 CUDA)")
    p.add_argument("--several", type=int, nargs="+", default=None,
                   help="prompts of these lengths together beside the decodes (default: 16 40 64 100 CPU, "
                        "100 250 400 700 CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="both runners with compile (minutes of start-up)")
    p.add_argument("--out-name", default="mixed_steps")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.prompt_lens = args.prompt_lens or ([1024, 2048, 4096, 8192] if gpu else [128, 512, 1024])
    args.budget = args.budget or (2048 if gpu else 256)
    args.decodes = args.decodes or (32 if gpu else 8)
    args.context = args.context or (512 if gpu else 128)
    args.mixed_prompts = args.mixed_prompts or ([128, 512, 1536] if gpu else [32, 128])
    args.several = args.several or ([100, 250, 400, 700] if gpu else [16, 40, 64, 100])
    # On CUDA the flash kernel (auto must choose it); on a CPU the reference kernel of the same layout.
    args.varlen_mode = "auto" if gpu else "reference"
    if not gpu:
        torch.set_num_threads(1)
    preset = "gpu" if gpu else "cpu"
    longest = max(args.prompt_lens + [args.context + 64 + max(args.mixed_prompts), 2 * args.budget])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(ModelConfig(**MODELS[preset], max_seq_len=longest + 16, tie_embeddings=False))
    model = model.to(DTYPES[args.dtype]).eval()
    engines = build_engines(args, model)
    result: dict = {"machine": machine(args.device), "device": args.device, "dtype": args.dtype,
                    "model": {**MODELS[preset], "params": sum(x.numel() for x in model.parameters())},
                    "varlen_mode": args.varlen_mode, "settings": vars(args)}
    result["ttft"] = bench_ttft(args, engines, model.config.vocab_size)
    result["mixed"] = bench_mixed(args, engines, model.config.vocab_size)
    v = args.varlen_mode
    by_kind = {r["shape"]: r for r in result["mixed"]}          # "one": the longest single prompt
    several, longest_ttft = by_kind["several"], result["ttft"][-1]
    result["summary"] = {
        "mixed_step_speedup": round(several["speedup"], 3),
        "mixed_over_decode_varlen": round(several[f"mixed_over_decode_{v}"], 3),
        "mixed_over_decode_dense": round(several["mixed_over_decode_dense"], 3),
        "continuation_step_speedup": round(by_kind["continuation"]["speedup"], 3),
        "single_prompt_step_speedup": round(by_kind["one"]["speedup"], 3),
        "ttft_speedup_longest": round(longest_ttft["speedup"], 3),
        **{f"ttft_ms_{r['prompt_len']}_varlen": round(r[f"ttft_ms_{v}"], 2) for r in result["ttft"]},
        **{f"ttft_ms_{r['prompt_len']}_dense": round(r["ttft_ms_dense"], 2) for r in result["ttft"]},
        "prepare_ms_varlen": round(several[f"prepare_ms_{v}"], 3),
        "prepare_ms_dense": round(several["prepare_ms_dense"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / f"{args.out_name}.json", json.dumps(result, indent=1, default=str) + "\n")
    kernel = ("FlashAttention varlen" if gpu
              else "the plain-torch reference kernel, which scores every packed query against every packed key "
                   "(the whole step's, not its own sequence's), so it is slower here; on a CPU the runner's auto "
                   "mode keeps the dense path, and the flash kernel's gain is measured with --device cuda")
    lines = [f"# Mixed and prefill steps: {result['machine']}, {args.dtype}", "",
             f"Model: random Llama, {model.config.num_layers} layers, {result['model']['params'] / 1e6:.0f}M "
             f"parameters, {model.config.num_heads} heads / {model.config.num_kv_heads} K/V heads"
             f"{', compiled' if args.compile else ''}. Varlen = {kernel}; dense = padded sequences, boolean mask, "
             f"SDPA. Medians of {args.repeats}, the two alternating.", "",
             f"| prompt tokens | chunks of {args.budget} | TTFT dense ms | TTFT varlen ms | speedup |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['prompt_len']} | {r['chunks']} | {r['ttft_ms_dense']:.2f} | {r[f'ttft_ms_{v}']:.2f} | "
              f"{r['speedup']:.2f}x |" for r in result["ttft"]]
    lines += ["", f"{args.decodes} sequences decoding at context {args.context}, plus new prompts in one step:", "",
              "| prompts | decode ms (dense / varlen) | mixed dense ms | mixed varlen ms | speedup | "
              "mixed / decode dense | mixed / decode varlen | prepare ms dense / varlen |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']}: {'+'.join(map(str, r['prompts']))} | "
              f"{r['decode_ms_dense']:.2f} / {r[f'decode_ms_{v}']:.2f} | "
              f"{r['mixed_ms_dense']:.2f} | {r[f'mixed_ms_{v}']:.2f} | {r['speedup']:.2f}x | "
              f"{r['mixed_over_decode_dense']:.2f} | {r[f'mixed_over_decode_{v}']:.2f} | "
              f"{r['prepare_ms_dense']:.2f} / {r[f'prepare_ms_{v}']:.2f} |" for r in result["mixed"]]
    lines += ["", "Summary: " + ", ".join(f"{k} {val}" for k, val in result["summary"].items())]
    atomic.write_text(RESULTS / f"{args.out_name}.md", "\n".join(lines) + "\n")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
