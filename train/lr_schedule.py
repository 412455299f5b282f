"""Warmup then decay (cosine by default) from `optimizer.lr` to `optimizer.min_lr`, as a LambdaLR.

The factor is a small callable object rather than a closure so the scheduler's `state_dict()` holds its settings
and a checkpoint restores the schedule exactly.
"""

from __future__ import annotations

import math

import torch

from glassbox.train.config import OptimizerConfig, ScheduleConfig


class WarmupDecay:
    """factor(i) for the 0-based step index i: linear warmup to 1, then decay to min_lr / lr at the last step."""

    def __init__(self, steps: int, warmup_steps: int, decay: str, min_ratio: float):
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.min_ratio = min_ratio

    def __call__(self, i: int) -> float:
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


def _factor(opt: OptimizerConfig, schedule: ScheduleConfig) -> WarmupDecay:
    return WarmupDecay(schedule.steps, schedule.warmup_steps, schedule.decay, opt.min_lr / opt.lr)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, opt: OptimizerConfig,
                       schedule: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(opt, schedule))


def follow_config(scheduler: torch.optim.lr_scheduler.LambdaLR, opt: OptimizerConfig,
                  schedule: ScheduleConfig) -> str | None:
    """After a restore, make the schedule the run config's, keeping the restored step count.

    A checkpoint restores the schedule it was saved with; a run resumed with more `schedule.steps` (extending a
    run) or another `lr` / `min_lr` means the new values, so they replace the restored ones and the current LR is
    recomputed from them. Returns what changed (for the log), or None when the config matches the checkpoint, in
    which case nothing is touched and resume stays bit-exact.
    """
    wanted = _factor(opt, schedule)
    current = scheduler.lr_lambdas[0]
    changes = [f"{name} {getattr(current, name)} -> {value}" for name, value in vars(wanted).items()
               if getattr(current, name) != value]
    if any(base != opt.lr for base in scheduler.base_lrs):
        changes.append(f"lr {scheduler.base_lrs[0]} -> {opt.lr}")
    if not changes:
        return None
    for fn in scheduler.lr_lambdas:
        vars(fn).update(vars(wanted))
    scheduler.base_lrs = [opt.lr] * len(scheduler.base_lrs)
    # get_last_lr() is what the next step applies: the value for the restored step under the new settings.
    scheduler._last_lr = [opt.lr * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    return ", ".join(changes)
