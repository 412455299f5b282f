"""Everything a training run carries from step to step, in one object the callbacks can read and restore."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    config: Any                      # the resolved run config (glassbox.train.config.RunConfig)
    run_dir: Path
    model: torch.nn.Module           # as trained: possibly wrapped by DDP or sharded by FSDP2 / tensor parallel
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any                # torch.optim.lr_scheduler.LRScheduler
    sampler: Any                     # glassbox.data.sampler.GlobalSampler
    batch_plan: Any                  # glassbox.train.batch_plan.BatchPlan
    step: int = 0                    # completed optimizer steps
    samples: int = 0                 # samples consumed (== sampler cursor within the run)
    tokens: int = 0                  # training tokens consumed
    metrics: dict[str, Any] = field(default_factory=dict)   # the last step's metrics row
    extra: dict[str, Any] = field(default_factory=dict)     # state later modules (SCAR, Pollux) save in checkpoints
    world: Any = None                # glassbox.train.parallel.World: rank, dp/tp sizes, device mesh (not saved)
