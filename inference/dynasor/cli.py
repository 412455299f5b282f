"""`glassbox dynasor data`: the reasoning model's training data, prepared with its base model's tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dynasor", help="Dynasor: the reasoning model's training data (see docs/dynasor.md)")
    dsub = p.add_subparsers(dest="dynasor_command", metavar="SUBCOMMAND", required=True)
    d = dsub.add_parser("data", help="write reasoning-gym worked solutions and prepare them as a DATA_DIR")
    d.add_argument("--base", type=Path, required=True, help="the base model directory (its tokenizer.json)")
    d.add_argument("--out", type=Path, required=True, help="the DATA_DIR to prepare")
    d.add_argument("--count", type=int, default=20000, help="training documents (default 20000)")
    d.set_defaults(handler=run_data)


def run_data(args: argparse.Namespace) -> int:
    from glassbox.errors import GlassboxError
    from glassbox.inference.dynasor.tasks import write_training_data

    tokenizer = args.base / "tokenizer.json"
    if not tokenizer.is_file():
        raise GlassboxError(f"--base {args.base}: no tokenizer.json")
    jsonl = write_training_data(args.out, tokenizer, args.count)
    print(f"{args.count} documents in {jsonl}, prepared into {args.out}")
    return 0
