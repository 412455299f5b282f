"""A tqdm bar over the run's steps on rank 0, showing the last loss, learning rate and throughput."""

from __future__ import annotations

from glassbox.train.callbacks import Callback
from glassbox.train.state import TrainState


class ProgressBar(Callback):
    order = 100                      # metrics only: after the callbacks that change state

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def on_step_end(self, state: TrainState) -> None:
        if not self.enabled or (state.world is not None and not state.world.is_main):
            return
        if self.bar is None:
            # Made on the first step rather than at train start, so it counts from wherever a resume left the run.
            from tqdm import tqdm

            self.bar = tqdm(total=state.config.schedule.steps, initial=state.step - 1, desc="train", unit="step",
                            dynamic_ncols=True)
        m = state.metrics
        postfix = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}", "tok/s": f"{m['tokens_per_s']:.0f}"}
        if "val_loss" in m:
            postfix["val"] = f"{m['val_loss']:.4f}"
        if "val_kl" in m:
            postfix["val_kl"] = f"{m['val_kl']:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
