"""SuffixDecoding acceptance and drafting cost: glassbox's proposer beside arctic-inference's cache, same rules.

Both run through `glassbox.inference.speculative.simulator.simulate` on the trace sets bench/suffix_traces.py
builds (code edits, structured tool calls, open text), in path and tree mode, with the same parameters: tree depth
--max-depth, draft budget --max-spec-tokens (the budget, not the depth, which arctic's own simulator passes in
its place), --max-spec-factor, offset 0, --min-token-prob. The arctic side drafts from its per-request tree and its
global tree and keeps the higher score, exactly as its `SuffixDecodingCache.speculate` does; like that cache it
feeds each response to its global tree while generating, where glassbox adds an output once it is finished.

arctic-inference is not a dependency: build its suffix-tree extension from the sdist in a scratch folder and pass
the folder holding `_C*.so` as --arctic-build (without it, only glassbox runs):

    pip download --no-binary arctic-inference --no-deps arctic-inference==0.3.0 && tar xzf arctic_inference-0.3.0.tar.gz
    cd arctic_inference-0.3.0/csrc/suffix_decoding && mkdir build && cd build   # needs nanobind and cmake
    cmake .. -DPython_EXECUTABLE=$(which python) && make
    python bench/suffix_acceptance.py --arctic-build arctic_inference-0.3.0/csrc/suffix_decoding/build

Timings: the median over --repeats runs of each side's per-call median and p99 (runs alternate between the two
sides so load on a shared machine falls on both alike). Writes bench/results/suffix_acceptance.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from glassbox import atomic
from glassbox.inference.speculative.draft import Draft
from glassbox.inference.speculative.simulator import GlassboxSpeculator, load_traces, simulate
from glassbox.inference.speculative.suffix import SuffixConfig

ROOT = Path(__file__).resolve().parents[1]
SETS = ("code_edit", "structured", "open_text")


class ArcticSpeculator:
    """arctic-inference's C++ SuffixTree driven the way its SuffixDecodingCache drives it."""

    def __init__(self, native: Any, cfg: SuffixConfig) -> None:
        self.native = native
        self.cfg = cfg
        self.global_tree = native.SuffixTree(cfg.max_depth)
        self.local: dict[int, Any] = {}

    def start(self, req_id: int, prompt: list[int]) -> None:
        tree = self.local[req_id] = self.native.SuffixTree(self.cfg.max_depth)
        tree.extend(0, prompt)

    def draft(self, req_id: int, context: list[int]) -> Draft:
        c = self.cfg
        args = (context, c.max_spec_tokens, c.max_spec_factor, c.spec_offset, c.min_token_prob, c.mode == "tree")
        a = self.local[req_id].speculate(*args)
        b = self.global_tree.speculate(*args)
        d = a if a.score >= b.score else b
        return Draft(tuple(d.token_ids), tuple(d.parents), d.score)

    def extend(self, req_id: int, tokens: list[int]) -> None:
        self.local[req_id].extend(0, tokens)
        self.global_tree.extend(req_id, tokens)

    def finish(self, req_id: int) -> None:
        del self.local[req_id]


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}


def run_side(make, requests, repeats: int) -> dict[str, float]:
    runs = [simulate(make(), requests) for _ in range(repeats)]
    out = dict(runs[0])
    for key in ("draft_us_median", "draft_us_p99", "draft_us_mean", "append_us_per_token", "prompt_us_per_token"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces-dir", default=str(ROOT / "bench" / "traces"))
    ap.add_argument("--arctic-build", default=None, help="folder holding arctic-inference's built _C extension")
    ap.add_argument("--max-depth", type=int, default=24)
    ap.add_argument("--max-spec-tokens", type=int, default=24)
    ap.add_argument("--max-spec-factor", type=float, default=1.0)
    ap.add_argument("--min-token-prob", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-name", default="suffix_acceptance")
    args = ap.parse_args()
    native = None
    if args.arctic_build:
        sys.path.insert(0, args.arctic_build)
        native = importlib.import_module("_C")
    rows = []
    for name in SETS:
        requests = load_traces(Path(args.traces_dir) / f"suffix_{name}.jsonl.gz")
        for mode in ("path", "tree"):
            cfg = SuffixConfig(max_depth=args.max_depth, max_spec_tokens=args.max_spec_tokens,
                               max_spec_factor=args.max_spec_factor, min_token_prob=args.min_token_prob, mode=mode)
            row: dict[str, Any] = {"traces": name, "mode": mode, "requests": len(requests),
                                   "response_tokens": sum(len(r.response) for r in requests)}
            row["glassbox"] = run_side(lambda: GlassboxSpeculator(cfg), requests, args.repeats)
            if native is not None:
                row["arctic"] = run_side(lambda: ArcticSpeculator(native, cfg), requests, args.repeats)
            rows.append(row)
            print(name, mode, {k: round(v["tokens_per_step"], 3) for k, v in row.items() if isinstance(v, dict)},
                  flush=True)
    summary: dict[str, Any] = {}
    for name in SETS:
        g = next(r for r in rows if r["traces"] == name and r["mode"] == "tree")
        summary[f"tokens_per_step_tree_{name}"] = g["glassbox"]["tokens_per_step"]
        summary[f"draft_us_median_tree_{name}"] = g["glassbox"]["draft_us_median"]
        if "arctic" in g:
            summary[f"arctic_tokens_per_step_tree_{name}"] = g["arctic"]["tokens_per_step"]
            summary[f"tokens_per_step_ratio_tree_{name}"] = g["glassbox"]["tokens_per_step"] / g["arctic"]["tokens_per_step"]
            summary[f"draft_cost_ratio_tree_{name}"] = g["glassbox"]["draft_us_median"] / g["arctic"]["draft_us_median"]
    if native is not None:
        tree_rows = [r for r in rows if r["mode"] == "tree"]
        summary["tree_mode_tokens_per_step_ge_arctic_on_every_set"] = all(
            r["glassbox"]["tokens_per_step"] >= r["arctic"]["tokens_per_step"] for r in tree_rows)
        summary["worst_draft_cost_ratio_tree"] = max(
            r["glassbox"]["draft_us_median"] / r["arctic"]["draft_us_median"] for r in tree_rows)
    params = {"max_depth": args.max_depth, "max_spec_tokens": args.max_spec_tokens,
              "max_spec_factor": args.max_spec_factor, "spec_offset": 0.0, "min_token_prob": args.min_token_prob,
              "repeats": args.repeats}
    result = {"summary": summary, "machine": machine(), "params": params, "rows": rows}
    out = ROOT / "bench" / "results"
    atomic.write_json(out / f"{args.out_name}.json", result)
    atomic.write_text(out / f"{args.out_name}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    m, p = result["machine"], result["params"]
    lines = [
        "# SuffixDecoding acceptance and drafting cost",
        "",
        f"Machine: {m['host']} ({m['cpu']}, {m['cpus']} CPUs, Python {m['python']}). Parameters: depth "
        f"{p['max_depth']}, budget {p['max_spec_tokens']}, factor {p['max_spec_factor']}, offset 0, min token prob "
        f"{p['min_token_prob']}; timings are medians over {p['repeats']} alternating runs.",
        "",
        "| traces | mode | impl | tokens/step | acceptance | drafted/step | draft us p50 | draft us p99 "
        "| append us/token | prompt us/token |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        for impl in ("glassbox", "arctic"):
            if impl not in r:
                continue
            v = r[impl]
            lines.append(f"| {r['traces']} | {r['mode']} | {impl} | {v['tokens_per_step']:.3f} | "
                         f"{v['acceptance_rate']:.3f} | {v['drafted_per_step']:.2f} | {v['draft_us_median']:.1f} | "
                         f"{v['draft_us_p99']:.1f} | {v['append_us_per_token']:.2f} | {v['prompt_us_per_token']:.2f} |")
    lines += ["", "Summary: " + ", ".join(f"{k} = {round(v, 3) if isinstance(v, float) else v}"
                                         for k, v in result["summary"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
