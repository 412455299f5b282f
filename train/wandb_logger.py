"""Weights & Biases tracking on rank 0: offline by default (files under RUN_DIR/wandb, no network ever),
online only when the user sets `logging.wandb.mode: online`, or `disabled`."""

from __future__ import annotations

from pathlib import Path

from glassbox.config import to_dict
from glassbox.train.callbacks import Callback
from glassbox.train.state import TrainState


class WandbLogger(Callback):
    order = 100                      # metrics only: after the callbacks that change state

    def __init__(self):
        self.run = None

    def on_train_start(self, state: TrainState) -> None:
        wcfg = state.config.logging.wandb
        if wcfg.mode == "disabled" or (state.world is not None and not state.world.is_main):
            return
        import wandb

        run_dir = Path(state.run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=wcfg.mode,
            dir=str(run_dir),
            project=wcfg.project,
            name=wcfg.name or run_dir.resolve().name,
            config=to_dict(state.config),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def on_step_end(self, state: TrainState) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in state.metrics.items() if k != "step"}, step=state.step)

    def on_train_end(self, state: TrainState) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
