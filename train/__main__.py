"""The torchrun entry point: `torchrun --nproc-per-node N -m glassbox.train --config FILE [flags]`.

Every rank builds the same config and trainer; rank 0 writes the run directory and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from glassbox.errors import GlassboxError
from glassbox.train.cli import add_train_args, config_from_args, summary

if TYPE_CHECKING:
    from glassbox.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glassbox.train", description=__doc__.splitlines()[0])
    add_train_args(parser)
    args = parser.parse_args(argv)

    def build():
        from glassbox.train.trainer import Trainer

        return Trainer(config_from_args(args))

    return run_trainer(build)


def run_trainer(build: Callable[[], "Trainer"]) -> int:
    """Build and fit a trainer on this rank, as every torchrun entry point does: a config error is one line and
    exit status 2, rank 0 prints the summary, and the process group is torn down on the way out."""
    import torch.distributed as dist

    try:
        trainer = build()
        state = trainer.fit()
    except GlassboxError as e:
        print(f"glassbox: error: {e}", file=sys.stderr)
        return 2
    if trainer.world.is_main:
        print(summary(state))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
