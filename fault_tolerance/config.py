"""The `fault_tolerance:` section of a run config: how a restarted run recovers, SCAR's partial checkpoints, and
failure injection for tests and benchmarks.

This module imports nothing of glassbox.train: the run config (train/config.py) holds this section and the
trainer installs SCAR's callback from it, so fault_tolerance sits below train in the import graph, like
glassbox.checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from glassbox.config import ConfigError


@dataclass(frozen=True)
class FailureInjection:
    """Kill rank `rank` with SIGKILL when it starts step `step` (or, with `mid_save`, while it writes its blocks
    of the partial checkpoint of that step), after wiping its node-local copies: the loss of a node.

    `in_process` loses the rank's state without killing it: at the start of step `step` its blocks are
    restored in place, through the same recovery code and sources a restart uses (the benchmark's control for
    a real kill -9, which must give the same run)."""

    rank: int
    step: int
    mid_save: bool = False
    in_process: bool = False

    @classmethod
    def parse(cls, text: str, where: str = "fault_tolerance.inject") -> "FailureInjection":
        """`rank=1,step=40` or `rank=1,step=40,mid_save`."""
        fields: dict[str, int] = {}
        flags = {"mid_save": False, "in_process": False}
        for part in (p.strip() for p in text.split(",")):
            if part in flags:
                flags[part] = True
                continue
            key, sep, value = part.partition("=")
            if not sep or key not in ("rank", "step") or key in fields:
                raise ConfigError(f"{where}: expected 'rank=K,step=S[,mid_save|in_process]', got {text!r} (at {part!r})")
            try:
                fields[key] = int(value)
            except ValueError:
                raise ConfigError(f"{where}: {key} must be an integer, got {value!r}") from None
        if set(fields) != {"rank", "step"}:
            raise ConfigError(f"{where}: expected 'rank=K,step=S[,mid_save|in_process]', got {text!r}")
        if fields["rank"] < 0 or fields["step"] < 1:
            raise ConfigError(f"{where}: rank must be >= 0 and step >= 1, got {text!r}")
        if flags["mid_save"] and flags["in_process"]:
            raise ConfigError(f"{where}: mid_save and in_process exclude each other, got {text!r}")
        return cls(fields["rank"], fields["step"], **flags)

    def __str__(self) -> str:
        return f"rank={self.rank},step={self.step}" + "".join(f",{f}" for f in ("mid_save", "in_process")
                                                               if getattr(self, f))


@dataclass
class FaultToleranceConfig:
    # What a run restarted by torchrun (--max-restarts) does. none: nothing of SCAR runs (a restart resumes as
    # checkpoint.resume says); full: every rank rolls back to the last full checkpoint (the baseline, recorded as
    # an event); partial: survivors keep their state, the lost ranks' blocks come from the newest source.
    recovery: Literal["none", "full", "partial"] = "none"
    interval: int = 100             # C: the full-checkpoint interval whose I/O budget the partial checkpoints spend
    fraction: float = 0.25          # r: the share of the state written every r * C steps (0 < r <= 1)
    strategy: Literal["prioritized", "round_robin", "random"] = "prioritized"
    rows_per_block: int = 0         # rows of a parameter per block; 0: about `block_elements` elements per block
    block_elements: int = 65536
    local_dir: str = "/dev/shm/glassbox-scar"   # node-local fast storage for the survivors' copies
    inject: str | None = None       # "rank=K,step=S[,mid_save|in_process]": kill -9 rank K at step S (tests, benches)
    seed: int = 0                   # the random strategy's generator

    def validate(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"fault_tolerance.interval: must be >= 0 (0: no partial checkpoints), got "
                              f"{self.interval}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fault_tolerance.fraction: must be in (0, 1], got {self.fraction}")
        if self.rows_per_block < 0:
            raise ConfigError(f"fault_tolerance.rows_per_block: must be >= 0, got {self.rows_per_block}")
        if self.block_elements < 1:
            raise ConfigError(f"fault_tolerance.block_elements: must be >= 1, got {self.block_elements}")
        if not self.local_dir:
            raise ConfigError("fault_tolerance.local_dir: must not be empty")
        if self.inject is not None:
            FailureInjection.parse(self.inject)
            if self.recovery == "none":
                raise ConfigError("fault_tolerance.inject: needs fault_tolerance.recovery full or partial (a "
                                  "failure nothing recovers from only stops the run)")

    @property
    def enabled(self) -> bool:
        return self.recovery != "none"

    @property
    def partial_every(self) -> int:
        """Steps between partial checkpoints (r * C, at least 1); 0 when none are written."""
        if self.recovery != "partial" or self.interval == 0:
            return 0
        return max(1, math.floor(self.fraction * self.interval + 0.5))

    @property
    def injection(self) -> FailureInjection | None:
        return FailureInjection.parse(self.inject) if self.inject is not None else None
