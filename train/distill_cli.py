"""`glassbox swiftkv`: convert a Llama-style Hugging Face directory to SwiftKV (ALGORITHMS.md), generate the
teacher's data for distilling it, and export a distillation checkpoint as a SwiftKV directory.

The distillation itself is `glassbox train` with a `distill:` config (configs/swiftkv-distill.yaml); the
converted or exported directory serves with `glassbox serve DIR` and loads in transformers after
`import glassbox` (docs/swiftkv.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glassbox.models.swiftkv import DEFAULT_RIDGE, INIT_METHODS
from glassbox.data.calibration import DEFAULT_CALIB_TOKENS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swiftkv", help="SwiftKV: convert a model, make its distillation data, export the result")
    actions = p.add_subparsers(dest="swiftkv_command", metavar="ACTION", required=True)
    c = actions.add_parser("convert", help="transform a Llama HF directory: layers >= --layer read their KV from "
                                           "the normed hidden state entering that layer")
    c.add_argument("model_dir", type=Path, help="a Llama-style Hugging Face model directory")
    c.add_argument("--layer", type=int, required=True,
                   help="l in [1, layers]: layers below it are unchanged (Llama: half the layers)")
    c.add_argument("--group", type=int, default=1,
                   help="AcrossKV: this many consecutive layers >= l share one KV cache (default 1: none)")
    c.add_argument("--out", type=Path, required=True, help="the SwiftKV model directory to write")
    c.add_argument("--init", choices=INIT_METHODS, default="copy",
                   help="copy: the new projections are copies of the layers' own (the paper's); lsq: the K/V "
                        "projections are then fit by least squares to the teacher's keys and values on --calib")
    c.add_argument("--calib", metavar="DATA_DIR|SOURCE",
                   help="--init lsq's calibration text: a DATA_DIR from teacher-data (its train split: the "
                        "distillation's own data, best), or stdlib, or .txt/.jsonl/.parquet files")
    c.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help=f"calibration tokens to fit on (default {DEFAULT_CALIB_TOKENS}; at least the hidden size)")
    c.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help=f"the fit's ridge, relative to the mean diagonal of its normal matrix (default "
                        f"{DEFAULT_RIDGE:g})")
    c.set_defaults(handler=run_convert)

    t = actions.add_parser("teacher-data", help="answer prompts with the base model (glassbox's engine) and "
                                                "prepare the documents as a DATA_DIR for distillation")
    t.add_argument("model_dir", type=Path, help="the base (teacher) model directory, with its tokenizer.json")
    t.add_argument("--out", type=Path, required=True, metavar="DATA_DIR", help="the prepared data to write")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="a .jsonl (prompt field) or text file (one prompt a line)")
    src.add_argument("--stdlib", type=int, metavar="N",
                     help="N prompts asking to explain Python standard-library functions")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--seed", type=int, default=0, help="which --stdlib functions are drawn")
    t.set_defaults(handler=run_teacher_data)

    e = actions.add_parser("export", help="a distillation checkpoint -> a SwiftKV Hugging Face directory")
    e.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint directory, or a run directory for its latest")
    e.add_argument("--like", required=True, type=Path,
                   help="the SwiftKV directory the run started from (init_from): its config, tokenizer")
    e.add_argument("--out", required=True, type=Path)
    e.set_defaults(handler=run_export)


def run_convert(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.hf_swiftkv import convert

    out = convert(args.model_dir, args.layer, args.group, args.out, init=args.init, calib=args.calib,
                  calib_tokens=args.calib_tokens, ridge=args.ridge)
    print(f"SwiftKV model (layer {args.layer}, group {args.group}, init {args.init}) written to {out}")
    return 0


def run_teacher_data(args: argparse.Namespace) -> int:
    from glassbox.train.distill_data import generate_teacher_data, read_prompts, stdlib_prompts

    prompts = read_prompts(args.prompts) if args.prompts else stdlib_prompts(args.stdlib, args.seed)
    data = generate_teacher_data(args.model_dir, prompts, args.out, max_new_tokens=args.max_new_tokens,
                                 engine_options={"device": args.device, "dtype": args.dtype}, progress=True)
    print(f"{data.num_documents} teacher answers ({data.response_tokens} tokens) prepared into {data.data_dir}; "
          f"documents in {data.documents}")
    print(f"set distill.response_marker to {data.response_marker!r}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.hf_swiftkv import export_swiftkv_checkpoint

    out = export_swiftkv_checkpoint(args.checkpoint, args.like, args.out)
    print(f"SwiftKV model written to {out}")
    return 0
