"""The run config: every setting of a training run in typed sections, loaded from YAML plus `--set` overrides.

`load_run_config` is the single entry point; the resolved config is written back to RUN_DIR/config.yaml so a run
can be rebuilt exactly (its `data:` section is what `glassbox data batch` and `glassbox reproduce` read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from glassbox.checkpoints.config import CheckpointConfig
from glassbox.config import ConfigError, apply_overrides, from_dict, load_yaml
from glassbox.data.config import DataConfig
from glassbox.fault_tolerance.config import FaultToleranceConfig
from glassbox.models.transformer import ModelConfig
from glassbox.train.distill import DistillConfig


@dataclass
class OptimizerConfig:
    """AdamW; the defaults are Amber's recipe (ALGORITHMS.md)."""

    lr: float = 3e-4
    min_lr: float = 3e-5          # the cosine schedule's floor
    weight_decay: float = 0.1     # applied to matrices only, never to norms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0        # global L2 norm; 0 turns clipping off
    frozen: list[str] = field(default_factory=list)   # parameter names (fnmatch patterns) that are not trained

    def validate(self) -> None:
        # Each bound is written so that NaN fails it (every comparison with NaN is False).
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr: must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr: must be in [0, optimizer.lr={self.lr}], got {self.min_lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas: expected two values in [0, 1), got {self.betas}")
        if not self.eps > 0:    # AdamW divides by sqrt(v) + eps, and v is 0 for a gradient that stays 0
            raise ConfigError(f"optimizer.eps: must be positive, got {self.eps}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"optimizer.grad_clip: must be >= 0, got {self.grad_clip}")
        if any(not isinstance(p, str) or not p for p in self.frozen):
            raise ConfigError(f"optimizer.frozen: expected parameter name patterns, got {self.frozen}")


@dataclass
class ScheduleConfig:
    steps: int = 1000             # optimizer steps of the run
    warmup_steps: int = 100       # linear warmup from lr / warmup_steps to lr
    decay: Literal["cosine", "linear", "constant"] = "cosine"   # from lr to min_lr over the remaining steps

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"schedule.steps: must be positive, got {self.steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")


@dataclass
class BatchStage:
    """From step `from_step` on (1-based), the global batch is `size` samples and the LR is scaled by `lr_factor`."""

    from_step: int
    size: int
    lr_factor: float = 1.0


@dataclass
class BatchConfig:
    global_batch_size: int = 32   # samples per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8     # samples per forward/backward on one rank; more are accumulated
    schedule: list[BatchStage] = field(default_factory=list)   # optional per-step changes of the global batch
    plan: str = "auto"            # the step plan: auto (fixed, or staged with a schedule), fixed, scheduled, or
                                  # one registered by a module (train/step_plan.py register_plan)

    def validate(self) -> None:
        """Micro-batches must split every global batch evenly: the gradient-noise statistics (GradientStats)
        take each one to hold `micro_batch_size` samples. The split of each rank's share (global / data-parallel
        ranks) depends on the world size, so the trainer checks that when it starts."""
        m = self.micro_batch_size
        if self.global_batch_size <= 0:
            raise ConfigError(f"batch.global_batch_size: must be positive, got {self.global_batch_size}")
        if m <= 0:
            raise ConfigError(f"batch.micro_batch_size: must be positive, got {m}")
        if self.global_batch_size % m:
            raise ConfigError(f"batch.micro_batch_size ({m}) must divide batch.global_batch_size "
                              f"({self.global_batch_size})")
        last = 0
        for i, stage in enumerate(self.schedule):
            if stage.from_step <= last:
                raise ConfigError(f"batch.schedule[{i}].from_step: must be >= 1 and increasing, got {stage.from_step}")
            if stage.size <= 0:
                raise ConfigError(f"batch.schedule[{i}].size: must be positive, got {stage.size}")
            if stage.size % m:
                raise ConfigError(f"batch.schedule[{i}].size ({stage.size}) must be a multiple of "
                                  f"batch.micro_batch_size ({m})")
            if not stage.lr_factor > 0:
                raise ConfigError(f"batch.schedule[{i}].lr_factor: must be positive, got {stage.lr_factor}")
            last = stage.from_step


@dataclass
class ParallelConfig:
    """How the model is spread over the processes torchrun starts; world size = data parallel x tensor_parallel."""

    data_parallel: Literal["fsdp", "ddp"] = "fsdp"   # FSDP2 (fully_shard) or DistributedDataParallel
    tensor_parallel: int = 1      # DTensor tensor parallel degree (attention and dense MLPs)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False         # torch.compile each transformer block
    backend: Literal["auto", "gloo", "nccl"] = "auto"     # auto: nccl on GPU, gloo on CPU
    # Recompute each block's forward in the backward, keeping only its input: activation memory drops from
    # every block's intermediates to one block's plus a residual per block, for about one more forward of compute.
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.tensor_parallel < 1:
            raise ConfigError(f"parallel.tensor_parallel: must be >= 1, got {self.tensor_parallel}")
        if self.data_parallel == "ddp" and self.tensor_parallel > 1:
            raise ConfigError("parallel.data_parallel: tensor parallel needs fsdp (DDP cannot wrap DTensor weights)")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"   # offline never touches the network
    project: str = "glassbox"
    name: str = ""                # default: the run directory's name


@dataclass
class LoggingConfig:
    val_every: int = 0            # validation loss every N steps (0: only after the last step)
    val_samples: int = 64         # validation samples, the same fixed set every time
    progress: bool = True         # tqdm bar on rank 0
    peak_flops: float = 0.0       # per device, for MFU; 0: known GPU peak, or measured fp32 matmul peak on CPU
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if self.val_every < 0:
            raise ConfigError(f"logging.val_every: must be >= 0, got {self.val_every}")
        if self.val_samples <= 0:
            raise ConfigError(f"logging.val_samples: must be positive, got {self.val_samples}")
        # Each rank reads the whole validation set into host memory (int64 [val_samples, seq_len + 1]: 1.1 GB at
        # 65536 x 2049) and every validation runs a forward over it: 65536 samples of 2048 tokens are 134M tokens,
        # the forwards of 32 of Amber-7B's 4M-token batches, about 10 steps' time. More stalls a run for minutes.
        max_val_samples = 65536
        if self.val_samples > max_val_samples:
            raise ConfigError(f"logging.val_samples: must be <= {max_val_samples}, got {self.val_samples}")
        if not self.peak_flops >= 0:
            raise ConfigError(f"logging.peak_flops: must be >= 0, got {self.peak_flops}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)   # SwiftKV distillation (train/distill.py)
    run_dir: str = "runs/default"
    seed: int = 0                 # seeds Python, numpy and torch (model init); the data order has data.seed
    # A Hugging Face model directory whose weights start the run instead of a random init; its config.json
    # defines the model section (train/init_from.py) and its tokenizer.json must be the data's.
    init_from: str = ""

    def validate(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ConfigError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds schedule.steps ({self.schedule.steps})"
            )
        if not self.run_dir:
            raise ConfigError("run_dir: must not be empty")
        if self.distill.enabled and not self.init_from:
            raise ConfigError("distill.enabled: a distillation run starts from a SwiftKV model; set init_from to "
                              "a directory written by `glassbox swiftkv convert`")
        if self.distill.enabled and self.parallel.tensor_parallel > 1:
            raise ConfigError("distill.enabled: SwiftKV's projections have no tensor-parallel plan; use "
                              "parallel.tensor_parallel: 1")
        if self.fault_tolerance.enabled and self.checkpoint.resume is None:
            raise ConfigError("fault_tolerance.recovery: a restarted run resumes from its checkpoints first, so it "
                              "needs checkpoint.resume: auto (or a path)")


def run_config_from_dict(data: dict) -> RunConfig:
    """Build and check a run config; with `init_from`, its model section comes from that directory."""
    from glassbox.train.init_from import resolve_init_from

    return from_dict(RunConfig, resolve_init_from(data))


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides (dotted keys), and check every field."""
    return run_config_from_dict(apply_overrides(load_yaml(path), list(overrides or [])))
