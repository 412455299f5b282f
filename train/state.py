"""Everything a training run carries from step to step, in one object the callbacks can read and restore."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    """What a checkpoint saves (glassbox.checkpoints' CheckpointState protocol): model and optimizer to DCP, the
    counters and every part `stateful()` names to the loop-state file."""

    config: Any                      # the resolved run config (glassbox.train.config.RunConfig)
    run_dir: Path
    model: torch.nn.Module           # as trained: possibly wrapped by DDP or sharded by FSDP2 / tensor parallel
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any                # glassbox.train.lr_schedule.LRSchedule (anything with state_dict())
    sampler: Any                     # glassbox.data.sampler.GlobalSampler
    step_plan: Any                   # glassbox.train.step_plan.StepPlan
    step: int = 0                    # completed optimizer steps
    samples: int = 0                 # samples consumed (== sampler cursor within the run)
    tokens: int = 0                  # training tokens consumed
    metrics: dict[str, Any] = field(default_factory=dict)   # the last step's metrics row
    callback_states: dict[str, Any] = field(default_factory=dict)   # callbacks with state, by Callback.name
    world: Any = None                # glassbox.train.parallel.World: rank, dp/tp sizes, device mesh (not saved)

    def stateful(self) -> dict[str, Any]:
        """The parts saved beside the counters, by name (the sampler first: its data check runs first on load)."""
        parts = {"sampler": self.sampler, "step_plan": self.step_plan, "lr_scheduler": self.lr_scheduler}
        parts = {name: part for name, part in parts.items() if part is not None}
        parts.update({f"callback.{name}": cb for name, cb in self.callback_states.items()})
        return parts
