"""The learning rate as a function of training progress: warmup, then decay (cosine by default) to `min_lr`.

Computed in one place, `LRSchedule.lr(progress)`, from progress in samples (train/step_plan.py): `schedule.steps`
and `warmup_steps` count steps of the base global batch, so a fixed-batch run gets exactly the per-step schedule,
and a run whose batch changes (a schedule of stages, or Pollux) moves along the schedule by the samples it has
seen, not by its step count. The trainer multiplies in the step plan's LR scale. The schedule's settings are its
state, so a checkpoint restores it exactly; `follow_config` lets a resumed run take new settings.
"""

from __future__ import annotations

import math
from typing import Any

from glassbox.train.config import OptimizerConfig, ScheduleConfig


class WarmupDecay:
    """factor(i) for i steps of progress (a float): linear warmup to 1, then decay to min_lr / lr at the last step."""

    def __init__(self, steps: int, warmup_steps: int, decay: str, min_ratio: float):
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.min_ratio = min_ratio

    def __call__(self, i: float) -> float:
        if i < self.warmup_steps:
            return (i + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.steps - 1 - self.warmup_steps)
        progress = min(1.0, (i - self.warmup_steps) / span)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


class LRSchedule:
    """lr(progress) = peak_lr x WarmupDecay(progress / samples_per_step)."""

    def __init__(self, peak_lr: float, shape: WarmupDecay, samples_per_step: int):
        self.peak_lr = peak_lr
        self.shape = shape
        self.samples_per_step = samples_per_step

    def lr(self, progress: float) -> float:
        return self.peak_lr * self.shape(progress / self.samples_per_step)

    def state_dict(self) -> dict[str, Any]:
        return {"peak_lr": self.peak_lr, "samples_per_step": self.samples_per_step, **vars(self.shape)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.peak_lr = float(state.pop("peak_lr"))
        self.samples_per_step = int(state.pop("samples_per_step"))
        self.shape = WarmupDecay(**state)


def _shape(opt: OptimizerConfig, schedule: ScheduleConfig) -> WarmupDecay:
    return WarmupDecay(schedule.steps, schedule.warmup_steps, schedule.decay, opt.min_lr / opt.lr)


def build_lr_schedule(opt: OptimizerConfig, schedule: ScheduleConfig, samples_per_step: int) -> LRSchedule:
    return LRSchedule(opt.lr, _shape(opt, schedule), samples_per_step)


def follow_config(lr_schedule: LRSchedule, opt: OptimizerConfig, schedule: ScheduleConfig) -> str | None:
    """After a restore, make the schedule the run config's.

    A checkpoint restores the schedule it was saved with; a run resumed with more `schedule.steps` (extending a
    run) or another `lr` / `min_lr` means the new values, so they replace the restored ones. Returns what changed
    (for the log), or None when the config matches the checkpoint, in which case nothing is touched and resume
    stays bit-exact.
    """
    wanted = _shape(opt, schedule)
    changes = [f"{name} {getattr(lr_schedule.shape, name)} -> {value}" for name, value in vars(wanted).items()
               if getattr(lr_schedule.shape, name) != value]
    if lr_schedule.peak_lr != opt.lr:
        changes.append(f"lr {lr_schedule.peak_lr} -> {opt.lr}")
    if not changes:
        return None
    lr_schedule.shape = wanted
    lr_schedule.peak_lr = opt.lr
    return ", ".join(changes)
