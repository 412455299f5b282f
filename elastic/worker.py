"""The torchrun entry point of an elastic run: `torchrun ... -m glassbox.elastic.worker --config FILE [flags]`.

Every rank builds the run config, the Pollux plan and agent, and the default callbacks, and trains until
`schedule.steps`, or until a resize is asked for: by the agent (goodput pays for another world size) or by the
launcher's plan (`--stop-at STEP --then-nproc K`, standing in for workers that come or go at a known step). A
resize writes RUN_DIR/elastic/request.json and stops after a final checkpoint; `glassbox elastic run` reads it
and restarts at the new size from that checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glassbox.atomic import write_json
from glassbox.train.callbacks import Callback

REQUEST = Path("elastic") / "request.json"


def add_elastic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--elastic", dest="elastic_config", help="YAML file of the elastic section (glassbox.elastic.config)")
    p.add_argument("--elastic-set", dest="elastic_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an elastic setting, e.g. --elastic-set decide_every=5 (repeatable)")


class PlannedResize(Callback):
    """Stops the run after step `step` asking for `nproc` workers (a known change of the allocation)."""

    def __init__(self, step: int, nproc: int):
        self.step = step
        self.nproc = nproc
        self.trainer = None

    def setup(self, trainer) -> None:
        self.trainer = trainer

    def needs_state(self, step: int) -> bool:
        """True at the resize step, so the loop queues no step after it and the run stops exactly there."""
        return step == self.step

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            if self.trainer.world.is_main:
                write_json(self.trainer.run_dir / REQUEST, {"nproc": self.nproc, "step": state.step,
                                                            "reason": "planned"})
            self.trainer.request_stop()


def build_trainer(args: argparse.Namespace):
    """The run config's trainer with the Pollux plan and agent (and a planned resize, when asked)."""
    from glassbox.atomic import write_text
    from glassbox.config import dump_yaml
    from glassbox.elastic.agent import PolluxAgent, PolluxPlan
    from glassbox.elastic.config import load_elastic_config
    from glassbox.train.cli import config_from_args
    from glassbox.train.trainer import Trainer, default_callbacks

    cfg = config_from_args(args)
    ecfg = load_elastic_config(args.elastic_config, args.elastic_overrides)
    plan = PolluxPlan(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, ecfg.measure_every)
    callbacks = default_callbacks(cfg) + [PolluxAgent(ecfg, plan)]
    if args.stop_at is not None:
        callbacks.append(PlannedResize(args.stop_at, args.then_nproc))
    trainer = Trainer(cfg, callbacks=callbacks, plan=plan)
    if trainer.world.is_main:
        write_text(Path(cfg.run_dir) / "elastic.yaml", dump_yaml(ecfg))
    return trainer


def main(argv: list[str] | None = None) -> int:
    from glassbox.train.__main__ import run_trainer
    from glassbox.train.cli import add_train_args

    parser = argparse.ArgumentParser(prog="python -m glassbox.elastic.worker", description=__doc__.splitlines()[0])
    add_train_args(parser)
    add_elastic_args(parser)
    parser.add_argument("--stop-at", type=int, help="stop after this step, asking for --then-nproc workers")
    parser.add_argument("--then-nproc", type=int, default=1)
    args = parser.parse_args(argv)
    return run_trainer(lambda: build_trainer(args))


if __name__ == "__main__":
    sys.exit(main())
