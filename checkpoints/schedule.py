"""Which steps are checkpointed and which checkpoints retention keeps.

Saves happen every `every` steps, at Pythia's log-spaced early steps (1, 2, 4, ..., 512) when asked, and at the
last step. With `keep_last = K`, older checkpoints are deleted except the release schedule: the log-spaced steps
(when on) and multiples of `keep_every`; `keep_last = 0` keeps everything, as release runs need.
"""

from __future__ import annotations

from glassbox.checkpoints.config import CheckpointConfig

LOG_SPACED_LIMIT = 512


def log_spaced_steps(limit: int = LOG_SPACED_LIMIT) -> list[int]:
    steps, s = [], 1
    while s <= limit:
        steps.append(s)
        s *= 2
    return steps


def is_scheduled(step: int, cfg: CheckpointConfig, last_step: int) -> bool:
    if step <= 0:
        return False
    if cfg.every and step % cfg.every == 0:
        return True
    if cfg.log_spaced and step in log_spaced_steps():
        return True
    return cfg.save_final and step == last_step


def is_release_step(step: int, cfg: CheckpointConfig) -> bool:
    return (cfg.log_spaced and step in log_spaced_steps()) or bool(cfg.keep_every and step % cfg.keep_every == 0)


def steps_to_delete(steps: list[int], cfg: CheckpointConfig) -> list[int]:
    """Committed checkpoint steps that retention removes (never the newest `keep_last`)."""
    if cfg.keep_last == 0:
        return []
    ordered = sorted(steps)
    recent = set(ordered[-cfg.keep_last:])
    return [s for s in ordered if s not in recent and not is_release_step(s, cfg)]
