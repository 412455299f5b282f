"""`glassbox speculate simulate`: replay token traces through SuffixDecoding offline (tuning, comparisons)."""

from __future__ import annotations

import argparse
import json

from glassbox.errors import GlassboxError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speculate", help="speculative decoding tools (offline simulation)")
    inner = p.add_subparsers(dest="speculate_command", metavar="SUBCOMMAND")
    s = inner.add_parser("simulate", help="tokens per step SuffixDecoding would reach on token traces")
    s.add_argument("traces", help="JSONL(.gz) file, one request per line: {\"prompt\": [ids], \"response\": [ids]}")
    s.add_argument("--mode", choices=["path", "tree"], default="tree", help="draft one branch or a token tree")
    s.add_argument("--max-depth", type=int, default=None, help="longest string the suffix tries keep")
    s.add_argument("--max-spec-tokens", type=int, default=None, help="draft tokens per step, at most")
    s.add_argument("--max-spec-factor", type=float, default=None, help="a match of p tokens drafts <= F*p + offset")
    s.add_argument("--spec-offset", type=float, default=None, help="the offset in F*p + offset")
    s.add_argument("--min-token-prob", type=float, default=None, help="smallest path probability drafted")
    s.add_argument("--max-cached-requests", type=int, default=None, help="outputs the global trie keeps")
    s.add_argument("--warm", type=int, default=0, help="first N requests only fill the global trie")
    s.add_argument("--out", required=True, help="where to write the result JSON")
    s.set_defaults(handler=run_simulate)
    p.set_defaults(handler=lambda args: p.print_help())


def run_simulate(args: argparse.Namespace) -> int:
    from glassbox import atomic
    from glassbox.inference.speculative.simulator import GlassboxSpeculator, load_traces, simulate
    from glassbox.inference.speculative.suffix import SuffixConfig

    fields = {"mode": args.mode, "max_depth": args.max_depth, "max_spec_tokens": args.max_spec_tokens,
              "max_spec_factor": args.max_spec_factor, "spec_offset": args.spec_offset,
              "min_token_prob": args.min_token_prob, "max_cached_requests": args.max_cached_requests}
    config = SuffixConfig.from_dict({k: v for k, v in fields.items() if v is not None})
    requests = load_traces(args.traces)
    if args.warm > len(requests):
        raise GlassboxError(f"--warm {args.warm} exceeds the {len(requests)} requests in {args.traces}")
    result = simulate(GlassboxSpeculator(config), requests, warm=args.warm)
    atomic.write_json(args.out, {"traces": args.traces, "warm": args.warm, "config": config.to_dict(), **result})
    print(json.dumps({k: round(result[k], 3) for k in ("tokens_per_step", "acceptance_rate", "draft_us_median")}))
    return 0
