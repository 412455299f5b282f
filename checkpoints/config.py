"""When and how checkpoints are written and read: the `checkpoint:` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glassbox.config import ConfigError


@dataclass
class CheckpointConfig:
    every: int = 0              # save every N steps; 0 saves only the log-spaced steps (if on) and the last step
    log_spaced: bool = False    # also save steps 1, 2, 4, ..., 512 (Pythia's early schedule)
    save_final: bool = True     # save the last step of the run
    keep_last: int = 0          # 0 keeps every checkpoint (release runs); K keeps the last K plus log-spaced ones
    keep_every: int = 0         # with keep_last: also keep every step that is a multiple of this (release schedule)
    async_save: bool = False    # save in the background (GPU runs); the blocking stall is measured and logged
    resume: str | None = None   # None: start fresh; "auto": newest verified checkpoint; or a checkpoint path
    allow_data_change: bool = False   # resume even if the data fingerprint differs from the checkpoint's
    on_save_error: Literal["stop", "continue"] = "stop"   # a save that fails (disk full): stop, or train on

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every: must be >= 0, got {self.every}")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last: must be >= 0, got {self.keep_last}")
        if self.keep_every < 0:
            raise ConfigError(f"checkpoint.keep_every: must be >= 0, got {self.keep_every}")
        if self.resume is not None and not self.resume:
            raise ConfigError("checkpoint.resume: expected 'auto' or a checkpoint path, got an empty string")
