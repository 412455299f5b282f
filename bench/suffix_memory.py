"""SuffixDecoding's global trie: bytes per cached token, and a soak showing it stays under its cap.

1. Footprint: every response of the three trace sets (bench/traces/) joins one global trie (no eviction);
   tracemalloc measures what the trie really holds (arrays, children dicts, kept outputs), beside the estimate
   `SuffixProposer.stats()["tree_bytes"]` reports to /metrics; both per cached token.
2. Soak: --soak-requests requests, each a real trace response chosen at random, finish through the proposer
   with max_cached_requests = --cap. After every request: cached requests <= cap; at checkpoints the global
   trie's nodes must equal those of a trie built fresh from the outputs it still holds (nothing leaks), and its
   allocated node slots (arrays grow by doubling and never shrink; freed slots are reused) must stay within
   twice the peak of live nodes plus one reservation, so memory follows what the cap admits, not the traffic.

With --arctic-build (see bench/suffix_acceptance.py), arctic-inference's global tree takes the same responses
and reports its own estimate (`SuffixTree.estimate_memory`), side by side.

Writes bench/results/suffix_memory.{json,md}.

    python bench/suffix_memory.py [--arctic-build DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import random
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from glassbox import atomic
from glassbox.inference.speculative.simulator import load_traces
from glassbox.inference.speculative.suffix import SuffixConfig, SuffixProposer
from glassbox.inference.speculative.suffix_tree import SuffixTrie

ROOT = Path(__file__).resolve().parents[1]
SETS = ("code_edit", "structured", "open_text")


def allocated_bytes(trie: SuffixTrie) -> int:
    arrays = (trie.token, trie.depth, trie.count, trie.out, trie.best, trie.link, trie.free)
    return sum(a.buffer_info()[1] * a.itemsize for a in arrays) + sum(sys.getsizeof(d) for d in trie.kids.values())


def finish(prop: SuffixProposer, seq_id: int, prompt: list[int], response: list[int]) -> None:
    """A request through the proposer's life cycle: seen with its last prompt token (the prompt's own trie is not
    what is measured), then finished with its response, which joins the global trie."""
    seq = SimpleNamespace(seq_id=seq_id, token_ids=prompt[-1:], prompt_len=1, finish_reason=None)
    prop.propose([seq], max_tokens=0)
    seq.token_ids = seq.token_ids + response
    seq.finish_reason = "stop"
    prop.on_finished(seq)


def footprint(requests, depth: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    prop = SuffixProposer(SuffixConfig(max_depth=depth, max_cached_requests=len(requests) + 1))
    for i, r in enumerate(requests):
        finish(prop, i, r.prompt, r.response)
    gc.collect()
    measured = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = prop.stats()
    tokens = stats["cached_tokens"]
    return {"cached_requests": stats["cached_requests"], "cached_tokens": tokens, "tree_nodes": stats["tree_nodes"],
            "nodes_per_token": stats["tree_nodes"] / tokens, "measured_bytes": float(measured),
            "measured_bytes_per_token": measured / tokens, "reported_bytes": stats["tree_bytes"],
            "reported_bytes_per_token": stats["tree_bytes"] / tokens}


def arctic_footprint(build: str, requests, depth: int) -> dict[str, float]:
    sys.path.insert(0, build)
    native = importlib.import_module("_C")
    tree = native.SuffixTree(depth)
    tokens = 0
    for i, r in enumerate(requests):
        tree.extend(i, r.response)
        tokens += len(r.response)
    return {"cached_tokens": float(tokens), "estimated_bytes": float(tree.estimate_memory()),
            "estimated_bytes_per_token": tree.estimate_memory() / tokens}


def soak(requests, depth: int, cap: int, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    prop = SuffixProposer(SuffixConfig(max_depth=depth, max_cached_requests=cap))
    g = prop.cache.global_trie
    samples = []
    peak_nodes = 0
    reserve = max(len(r.response) for r in requests) * depth
    within = True
    worst_over_cap = 0
    for i in range(n):
        r = rng.choice(requests)
        finish(prop, i, r.prompt, r.response)
        stats = prop.stats()
        worst_over_cap = max(worst_over_cap, int(stats["cached_requests"]) - cap)
        peak_nodes = max(peak_nodes, g.num_nodes)
        within = within and g.allocated_nodes() <= 2 * peak_nodes + reserve
        if (i + 1) % max(1, n // 20) == 0:
            fresh = SuffixTrie(depth)
            for out in prop.cache._cached.values():
                fresh.insert(list(out))
            samples.append({"requests": i + 1, "cached_requests": stats["cached_requests"],
                            "tree_nodes": stats["tree_nodes"], "fresh_tree_nodes": float(fresh.num_nodes),
                            "reported_bytes": stats["tree_bytes"], "allocated_bytes": float(allocated_bytes(g)),
                            "allocated_nodes": float(g.allocated_nodes()), "peak_nodes": float(peak_nodes)})
    g.check()
    return {"cap": cap, "requests": n, "samples": samples, "reserve_nodes": reserve,
            "max_allocated_bytes": max(s["allocated_bytes"] for s in samples),
            "never_over_cap": worst_over_cap <= 0,
            "no_leak": all(s["tree_nodes"] == s["fresh_tree_nodes"] for s in samples),
            "allocated_within_twice_peak": within}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces-dir", default=str(ROOT / "bench" / "traces"))
    ap.add_argument("--max-depth", type=int, default=24)
    ap.add_argument("--cap", type=int, default=64)
    ap.add_argument("--soak-requests", type=int, default=2000)
    ap.add_argument("--arctic-build", default=None, help="folder holding arctic-inference's built _C extension")
    ap.add_argument("--out-name", default="suffix_memory")
    args = ap.parse_args()
    requests = [r for name in SETS for r in load_traces(Path(args.traces_dir) / f"suffix_{name}.jsonl.gz")]
    fp = footprint(requests, args.max_depth)
    arctic = arctic_footprint(args.arctic_build, requests, args.max_depth) if args.arctic_build else None
    sk = soak(requests, args.max_depth, args.cap, args.soak_requests, seed=0)
    summary = {"global_tree_bytes_per_cached_token": fp["measured_bytes_per_token"],
               "reported_bytes_per_cached_token": fp["reported_bytes_per_token"],
               "soak_never_over_cap": sk["never_over_cap"], "soak_no_leak": sk["no_leak"],
               "soak_allocated_within_twice_peak": sk["allocated_within_twice_peak"],
               "soak_max_allocated_bytes": sk["max_allocated_bytes"]}
    if arctic:
        summary["arctic_estimated_bytes_per_cached_token"] = arctic["estimated_bytes_per_token"]
    result = {"summary": summary, "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                              "python": sys.version.split()[0]},
              "params": {"max_depth": args.max_depth, "cap": args.cap, "soak_requests": args.soak_requests},
              "footprint": fp, "arctic_footprint": arctic, "soak": sk}
    out = ROOT / "bench" / "results"
    atomic.write_json(out / f"{args.out_name}.json", result)
    atomic.write_text(out / f"{args.out_name}.md", markdown(result))
    print(markdown(result))
    return 0 if sk["never_over_cap"] and sk["no_leak"] and sk["allocated_within_twice_peak"] else 1


def markdown(result: dict[str, Any]) -> str:
    fp, sk, m, p = result["footprint"], result["soak"], result["machine"], result["params"]
    lines = [
        "# SuffixDecoding global trie memory", "",
        f"Machine: {m['host']} ({m['cpus']} CPUs, Python {m['python']}); depth {p['max_depth']}.", "",
        "## Footprint (every trace response cached)", "",
        "| cached requests | cached tokens | nodes | nodes/token | measured bytes/token | reported bytes/token |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {fp['cached_requests']:.0f} | {fp['cached_tokens']:.0f} | {fp['tree_nodes']:.0f} | "
        f"{fp['nodes_per_token']:.2f} | {fp['measured_bytes_per_token']:.0f} | {fp['reported_bytes_per_token']:.0f} |",
        "",
    ]
    if result["arctic_footprint"]:
        lines += [f"arctic-inference's global tree on the same responses, by its own estimate: "
                  f"{result['arctic_footprint']['estimated_bytes_per_token']:.0f} bytes per cached token "
                  "(it compresses single-occurrence paths; this trie stores every suffix up to the depth).", ""]
    lines += [
        f"## Soak: {sk['requests']} finished requests, cap {sk['cap']} cached requests", "",
        "| finished | cached | nodes | nodes of a fresh trie | peak nodes | allocated slots | reported bytes "
        "| allocated bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sk["samples"]:
        lines.append(f"| {s['requests']} | {s['cached_requests']:.0f} | {s['tree_nodes']:.0f} | "
                     f"{s['fresh_tree_nodes']:.0f} | {s['peak_nodes']:.0f} | {s['allocated_nodes']:.0f} | "
                     f"{s['reported_bytes']:.0f} | {s['allocated_bytes']:.0f} |")
    lines += ["", f"Never over the cap: {sk['never_over_cap']}; nodes equal a fresh trie's (no leak): {sk['no_leak']}; "
              f"allocated slots within 2x the peak live nodes + one reservation ({sk['reserve_nodes']}) after every request: "
              f"{sk['allocated_within_twice_peak']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
