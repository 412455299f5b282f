"""The `glassbox` command: one subcommand per job, each area registering its own.

Each area's `cli.py` exposes `register(subparsers)` and imports its heavy dependencies (torch, megatron-core)
inside the handlers, so `glassbox --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from glassbox import __version__
from glassbox.errors import GlassboxError

# Areas that contribute subcommands, in the order `--help` lists them. A module missing here is skipped so a
# partially installed tree still answers --help.
AREAS = [
    "glassbox.demo",
    "glassbox.data.cli",
    "glassbox.train.cli",
    "glassbox.checkpoints.cli",
    "glassbox.train.distill_cli",
    "glassbox.inference.cli",
    "glassbox.inference.ltr.cli",
    "glassbox.inference.dynasor.cli",
    "glassbox.pruning.cli",
    "glassbox.inference.speculative.cli",
    "glassbox.elastic.cli",
    "glassbox.elastic.sched.cli",
    "glassbox.release.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glassbox", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"glassbox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except GlassboxError as e:
        print(f"glassbox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
