"""`glassbox swiftkv convert`: a Llama-style Hugging Face directory -> its SwiftKV transform (ALGORITHMS.md).

The converted directory loads in glassbox's engine (`glassbox serve DIR`) and in transformers after
`import glassbox`; it is distilled with `glassbox train` and a distillation config (docs/swiftkv.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swiftkv", help="SwiftKV: convert a model (SingleInputKV + AcrossKV)")
    actions = p.add_subparsers(dest="swiftkv_command", metavar="ACTION", required=True)
    c = actions.add_parser("convert", help="transform a Llama HF directory: layers >= --layer read their KV from "
                                           "the normed hidden state entering that layer")
    c.add_argument("model_dir", type=Path, help="a Llama-style Hugging Face model directory")
    c.add_argument("--layer", type=int, required=True,
                   help="l in [1, layers]: layers below it are unchanged (Llama: half the layers)")
    c.add_argument("--group", type=int, default=1,
                   help="AcrossKV: this many consecutive layers >= l share one KV cache (default 1: none)")
    c.add_argument("--out", type=Path, required=True, help="the SwiftKV model directory to write")
    c.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.hf_swiftkv import convert

    out = convert(args.model_dir, args.layer, args.group, args.out)
    print(f"SwiftKV model (layer {args.layer}, group {args.group}) written to {out}")
    return 0
