"""The global batch size and learning-rate factor of each step.

The trainer asks the plan before every step, so the batch may change at any step: a fixed schedule here, and
later Pollux's goodput-adaptive choice (ALGORITHMS.md), which replaces the plan without touching the loop. The data
order does not depend on the plan (ARCHITECTURE.md, invariant 1): a step of size B takes the next B samples.
"""

from __future__ import annotations

from typing import Any

from glassbox.train.config import BatchConfig, BatchStage


class BatchPlan:
    """Constant global batch, LR factor 1. Subclasses override `global_batch_size` / `lr_factor` and their state."""

    def __init__(self, global_batch_size: int):
        self.base_size = global_batch_size

    def global_batch_size(self, step: int) -> int:
        """Samples in step `step` (1-based, the step about to run)."""
        return self.base_size

    def lr_factor(self, step: int) -> float:
        """Multiplies the scheduled learning rate of step `step` (e.g. sqrt of the batch ratio for Adam)."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "base_size": self.base_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_size = int(state["base_size"])


class ScheduledBatchPlan(BatchPlan):
    """Piecewise-constant: stage i holds from its `from_step` until the next stage starts."""

    def __init__(self, global_batch_size: int, stages: list[BatchStage]):
        super().__init__(global_batch_size)
        self.stages = list(stages)

    def _stage(self, step: int) -> BatchStage | None:
        current = None
        for stage in self.stages:
            if stage.from_step <= step:
                current = stage
        return current

    def global_batch_size(self, step: int) -> int:
        stage = self._stage(step)
        return stage.size if stage else self.base_size

    def lr_factor(self, step: int) -> float:
        stage = self._stage(step)
        return stage.lr_factor if stage else 1.0

    def state_dict(self) -> dict[str, Any]:
        stages = [{"from_step": s.from_step, "size": s.size, "lr_factor": s.lr_factor} for s in self.stages]
        return {**super().state_dict(), "stages": stages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stages = [BatchStage(**s) for s in state["stages"]]


def build_batch_plan(cfg: BatchConfig) -> BatchPlan:
    if cfg.schedule:
        return ScheduledBatchPlan(cfg.global_batch_size, cfg.schedule)
    return BatchPlan(cfg.global_batch_size)
