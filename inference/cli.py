"""`glassbox serve` (OpenAI-compatible server) and `glassbox generate` (offline completions) for a model directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from glassbox.errors import GlassboxError

# Where `glassbox serve` reads its API key when neither --api-key nor --api-key-file is given.
API_KEY_ENV = "GLASSBOX_API_KEY"


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a Hugging Face-format model directory (what `glassbox export` writes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight and KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch (default: 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step (default: 2048)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    p.add_argument("--policy", default="fcfs",
                   help="scheduling policy: fcfs, priority (the request's priority, lower first) or ltr (shortest "
                        "predicted output first; needs --ranker) (default: fcfs)")
    p.add_argument("--ranker", default=None, help="with --policy ltr: a ranker directory (`glassbox ltr train`)")
    p.add_argument("--starvation-steps", type=int, default=None,
                   help="a request passed over this many steps is promoted (default: 1000 under ltr, off otherwise)")
    p.add_argument("--promote-steps", type=int, default=None, help="served steps a promotion lasts (default: 10)")
    p.add_argument("--preemption", choices=["remaining", "never", "always"], default=None,
                   help="with --policy ltr: preempt a running request only when it pays (remaining, the default), "
                        "never, or whenever the ranking says")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks between prompts")
    p.add_argument("--compile", action="store_true",
                   help="dense models: torch.compile the decoder layer (decode graphs and eager batches; about 1.7x "
                        "faster decoding on the H100, at minutes of start-up)")
    p.add_argument("--graph-compile", default="per_size", choices=["per_size", "dynamic"],
                   help="with --compile: the decode graphs' layer compiled per captured batch size (per_size) or "
                        "once for a symbolic batch size (dynamic: a shorter cold start)")
    p.add_argument("--no-piecewise-graphs", action="store_true",
                   help="run prompt and mixed steps eagerly (by default, on CUDA, as graphs cut at attention)")
    p.add_argument("--compile-cache-dir", default=None,
                   help="with --compile: where compiled graphs are kept for the next start of the same model and "
                        "sizes (default: $GLASSBOX_COMPILE_CACHE or ~/.cache/glassbox/compile)")
    p.add_argument("--no-compile-cache", action="store_true", help="with --compile: neither read nor write the cache")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over this many GPUs of this host (CPU: processes), one process each; dense "
                        "models whose heads and MLP units divide evenly (default: 1)")
    spec = p.add_argument_group("speculative decoding", "drafts verified as token trees in one forward; greedy "
                                "output is unchanged and sampled output keeps its distribution")
    spec.add_argument("--speculative", default="none", choices=["none", "suffix"],
                      help="suffix: SuffixDecoding drafts from suffix trees over the request and earlier outputs "
                           "(default: none)")
    spec.add_argument("--num-spec-tokens", type=int, default=None,
                      help=f"most draft nodes a sequence verifies per step (default: {DEFAULT_SPEC_TOKENS} with "
                           "--speculative)")
    spec.add_argument("--spec-batch-tokens", type=int, default=None,
                      help="most draft nodes per step over the whole batch, shared equally: drafts shrink as the "
                           "batch grows (default: 64)")
    spec.add_argument("--spec-min-score", type=float, default=None,
                      help="skip a draft whose expected accepted tokens (its score) is below this (default: 1.0)")
    from glassbox.inference.speculative.suffix import SuffixConfig

    defaults = SuffixConfig()
    for flag, field, text in SUFFIX_FLAGS:
        default = getattr(defaults, field)
        spec.add_argument(f"--suffix-{flag}", dest=f"suffix_{field}", type=type(default), default=None,
                          help=f"{text} (default: {default})")


# The suffix proposer's settings (SuffixConfig's fields, whose defaults they show) as flags: (flag, field, help).
SUFFIX_FLAGS = (
    ("max-depth", "max_depth", "longest match and draft the suffix trees keep"),
    ("max-spec-factor", "max_spec_factor", "a match of p tokens drafts up to factor x p + offset nodes"),
    ("spec-offset", "spec_offset", "the offset of that rule"),
    ("min-token-prob", "min_token_prob", "a draft node's path probability must reach this, in [0, 1]"),
    ("mode", "mode", "path (one branch) or tree (best-first token tree)"),
    ("max-cached-requests", "max_cached_requests", "finished outputs the global tree keeps, oldest evicted first"),
)
DEFAULT_SPEC_TOKENS = 16


def _engine_config(args: argparse.Namespace):
    from glassbox.inference.engine import EngineConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    options = {field: getattr(args, f"suffix_{field}") for _, field, _ in SUFFIX_FLAGS
               if getattr(args, f"suffix_{field}") is not None}
    if options and args.speculative != "suffix":
        raise GlassboxError(f"--suffix-* options need --speculative suffix (got {', '.join(options)})")
    num_spec = args.num_spec_tokens
    if num_spec is None:
        num_spec = DEFAULT_SPEC_TOKENS if args.speculative != "none" else 0
    policy_options = {name: getattr(args, name) for name in ("starvation_steps", "promote_steps", "preemption")
                      if getattr(args, name) is not None}
    if args.ranker is not None:
        if args.policy != "ltr":
            raise GlassboxError("--ranker needs --policy ltr")
        policy_options.update(ranker=args.ranker, device=args.device)
    elif args.policy == "ltr":
        raise GlassboxError("--policy ltr needs --ranker DIR (a ranker `glassbox ltr train` wrote)")
    return EngineConfig(device=args.device, dtype=dtype, policy_options=policy_options, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, policy=args.policy,
                        enable_prefix_caching=not args.no_prefix_caching, compile=args.compile,
                        graph_compile=args.graph_compile,
                        piecewise_graphs=False if args.no_piecewise_graphs else None,
                        compile_cache=not args.no_compile_cache, compile_cache_dir=args.compile_cache_dir,
                        tensor_parallel_size=args.tensor_parallel_size,
                        proposer=args.speculative, num_spec_tokens=num_spec, spec_options=options,
                        **{name: getattr(args, name) for name in ("spec_batch_tokens", "spec_min_score")
                           if getattr(args, name) is not None})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model directory over an OpenAI-compatible HTTP API")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 requests (other users see it in `ps`: prefer "
                        f"--api-key-file or ${API_KEY_ENV})")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the dir name)")
    p.add_argument("--limit-concurrency", type=int, default=None,
                   help="most open connections; one more is answered 503 and closed (default: 512, lowered to fit "
                        "the file-descriptor limit)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body; 413 beyond (default: 4 MiB)")
    p.add_argument("--max-prompts-per-request", type=int, default=None, dest="max_prompts",
                   help="most prompts in one completions request; 400 beyond (default: 64)")
    p.add_argument("--request-timeout", type=float, default=None, dest="request_timeout_s",
                   help="seconds a client has to send a whole request, from its first byte; 408 after (default: 30)")
    p.set_defaults(handler=run_serve)

    g = sub.add_parser("generate", help="complete prompts with a model directory, offline")
    _engine_args(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("-n", type=int, default=1, help="samples per prompt (default: 1)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.set_defaults(handler=run_generate)


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $GLASSBOX_API_KEY; None: no key is required."""
    if args.api_key is not None and args.api_key_file is not None:
        raise GlassboxError("serve: give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise GlassboxError(f"serve: --api-key-file {path}: no such file")
        lines = path.read_text().splitlines()
        if not lines or not lines[0].strip():
            raise GlassboxError(f"serve: --api-key-file {path}: the first line is empty")
        return lines[0].strip()
    return args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None


def run_serve(args: argparse.Namespace) -> int:
    from glassbox.inference.server import ServerLimits, serve

    api_key = _api_key(args)
    given = {name: getattr(args, name) for name in ("limit_concurrency", "max_body_bytes", "max_prompts",
                                                    "request_timeout_s") if getattr(args, name) is not None}
    auth = "an API key required" if api_key is not None else "no API key"
    print(f"glassbox: serving {args.model_dir} on http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    serve(args.model_dir, args.host, args.port, api_key, args.served_model_name, _engine_config(args),
          ServerLimits(**given))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from glassbox.inference.engine import LLMEngine
    from glassbox.inference.llm import LLM
    from glassbox.inference.sampling_params import SamplingParams

    llm = LLM(engine=LLMEngine.from_model_dir(args.model_dir, _engine_config(args)))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens, stop=args.stop)
    for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
        for o in out.outputs:
            label = f"[{o.index}] " if args.n > 1 else ""
            print(f"{label}{prompt}{o.text}")
            print(f"--- finish: {o.finish_reason}, {len(o.token_ids)} tokens")
    return 0
