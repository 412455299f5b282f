"""What one LTR scoring call costs on the device, and why: the ranker's trunk (SmolLM2-135M's shape, its first 4
layers, random weights) scoring prompts of the bench's lengths one batch at a time, as the LTR policy does when a
request must wait.

The H200 run of bench/ltr_scheduling.py (2026-12-03, 512-token outputs) spent 31 ms per scored request online
(1.2 s of a 16 s run at half load, the engine step waiting), where a 4-layer forward of a 135M model should take
about a millisecond. This separates the suspects, each a row: the forward alone on an idle card; beside an
engine-sized allocation (an engine sized from memory holds 0.85 of the card, leaving the caching allocator little
room for the ranker's ever-new shapes; the LTR bench's own pool is smaller); and with prompt lengths padded to a
multiple of --pad (shapes repeat, so the cached blocks and kernel choices do too). Median milliseconds per call
over --calls calls at batch 1, 4 and 32.

    python bench/ltr_scoring_cost.py --device cuda      # writes bench/results/ltr_scoring_cost.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.inference.ltr.collect import machine_name
from glassbox.inference.ltr.ranker import Trunk
from glassbox.models.transformer import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_throughput import sync  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, num_layers=4, num_heads=9, num_kv_heads=3,
                      intermediate_size=1536, max_seq_len=2048, rope_theta=100000.0)


def time_calls(trunk: Trunk, device: str, batch: int, calls: int, pad: int | None, rng: random.Random) -> float:
    """Median ms per features() call of `batch` prompts of 40-400 tokens (new lengths every call)."""
    times = []
    for _ in range(calls):
        prompts = [[rng.randrange(100, 49000) for _ in range(rng.randrange(40, 400))] for _ in range(batch)]
        sync(device)
        t0 = time.perf_counter()
        trunk.features(prompts, [4], 512, pad_to=pad)
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--pad", type=int, default=64)
    ap.add_argument("--fill", type=float, default=0.85, help="CUDA: share of the card held, as an engine's pool")
    ap.add_argument("--out-name", default="ltr_scoring_cost")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    trunk = Trunk(SMOLLM2).to(args.device, dtype).eval()
    rng = random.Random(0)
    time_calls(trunk, args.device, 4, 3, None, rng)                # first-call costs out of the rows
    rows = []

    def measure(setting: str, pad: int | None) -> None:
        for batch in (1, 4, 32):
            ms = time_calls(trunk, args.device, batch, args.calls, pad, rng)
            rows.append({"setting": setting, "batch": batch, "pad": pad, "median_ms_per_call": ms,
                         "ms_per_prompt": ms / batch})
            print(f"{setting:28s} batch {batch:2d}: {ms:8.2f} ms per call", flush=True)

    measure("idle card", None)
    measure("idle card, padded", args.pad)
    if args.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        held = torch.empty(int(free - (1 - args.fill) * total), dtype=torch.uint8, device=args.device)
        measure(f"beside {args.fill:.2f} of the card", None)
        measure(f"beside {args.fill:.2f}, padded", args.pad)
        print(f"held {held.numel() / 2**30:.1f} GiB of the card meanwhile", flush=True)
    machine = machine_name(args.device)
    result = {"machine": machine, "dtype": str(dtype), "calls": args.calls, "rows": rows,
              "summary": {f"{r['setting']} b{r['batch']}": r["median_ms_per_call"] for r in rows}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_json(RESULTS / f"{args.out_name}.json", result)
    lines = [f"# LTR ranker scoring cost per call ({machine}, {dtype})", "",
             "SmolLM2-135M's first 4 layers, random weights; prompts of 40-400 tokens, new lengths every call; "
             f"median of {args.calls} calls.", "", "| setting | batch | ms per call | ms per prompt |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['batch']} | {r['median_ms_per_call']:.2f} | {r['ms_per_prompt']:.2f} |"
              for r in rows]
    atomic.write_text(RESULTS / f"{args.out_name}.md", "\n".join(lines) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
