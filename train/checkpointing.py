"""The checkpoint callback: resume on start, save on schedule, notify the other callbacks of commits.

It lives with the loop (it knows the run config and the callbacks); the saving and loading themselves are
glassbox.checkpoints', which knows only the `CheckpointState` protocol. It runs first (order -100), so a
resumed state is in place before any other callback starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from glassbox.checkpoints.checkpointer import Checkpointer, CheckpointWriteError
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.loading import checkpoint_view, find_resume_checkpoint, load_checkpoint
from glassbox.checkpoints.schedule import is_scheduled
from glassbox.train.callbacks import Callback
from glassbox.train.lr_schedule import LRSchedule, follow_config

if TYPE_CHECKING:
    from glassbox.train.trainer import Trainer


class CheckpointCallback(Callback):
    """Resumes in `on_train_start` when `cfg.resume` is set, saves on schedule, and finishes async saves."""

    order = -100

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, log: Callable[[str], None] = print,
                 tokenizer_dir: Path | None = None, chat_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log
        self.checkpointer = Checkpointer(cfg, self.run_dir, log, tokenizer_dir, chat_dir)
        self.last_step: int | None = None
        self.trainer: "Trainer | None" = None
        self._notified: Path | None = None

    def setup(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def on_train_start(self, state: Any) -> None:
        schedule = getattr(state.config, "schedule", None)
        self.last_step = getattr(schedule, "steps", None)
        if not self.cfg.resume:
            return
        path = find_resume_checkpoint(self.run_dir, self.cfg.resume, self.log)
        if path is None:
            return
        load_checkpoint(path, state, allow_data_change=self.cfg.allow_data_change, verify_hashes=False)
        self.checkpointer.adopt(checkpoint_view(path))
        self._notified = path
        changed = None
        if isinstance(state.lr_scheduler, LRSchedule) and hasattr(state.config, "schedule"):
            changed = follow_config(state.lr_scheduler, state.config.optimizer, state.config.schedule)
        self.checkpointer.say(f"resumed from {path} at step {state.step}")
        if changed:
            self.checkpointer.say(f"the LR schedule follows the run config from here: {changed}")
        if self.trainer is not None:
            self.trainer.dispatch("on_resume", path)

    def needs_state(self, step: int) -> bool:
        """True on save steps: the save must see the state exactly as that step left it."""
        return is_scheduled(step, self.cfg, self.last_step or -1)

    def on_step_end(self, state: Any) -> None:
        self._guarded(self.checkpointer.poll)
        if self.needs_state(state.step):
            self._guarded(lambda: self.checkpointer.save(state))
        self._announce()

    def on_train_end(self, state: Any) -> None:
        if self.cfg.save_final and state.step > 0:
            self._guarded(lambda: self.checkpointer.save(state))
        self._guarded(self.checkpointer.close)
        self._announce()

    def _guarded(self, action: Callable[[], Any]) -> None:
        """Run a save; a failed one stops the run, or with `on_save_error: continue` is reported and skipped."""
        try:
            action()
        except CheckpointWriteError as e:
            if self.cfg.on_save_error == "stop":
                raise
            self.checkpointer.say(f"{e} Training continues (checkpoint.on_save_error: continue).")

    def _announce(self) -> None:
        """Tell the callbacks of a checkpoint committed since the last announcement."""
        path = self.checkpointer.last_path
        if path is None or path == self._notified or not path.is_dir():
            return
        self._notified = path
        if self.trainer is not None:
            self.trainer.dispatch("on_checkpoint", path)
