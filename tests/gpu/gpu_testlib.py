"""Helpers for the GPU tests: a run config on the shared prepared corpus, and NCCL process groups over GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from distributed import run_distributed
from glassbox.config import apply_overrides
from glassbox.train.config import RunConfig, run_config_from_dict

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_config(data_dir: Path, run_dir: Path, *overrides: str) -> RunConfig:
    """A small Llama (hidden 256, 4 layers) on the 512-token test vocabulary, sequence 128, on the GPU."""
    base = {
        "model": {"vocab_size": 512, "hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
                  "intermediate_size": 688, "max_seq_len": 128},
        "data": {"path": str(data_dir), "seq_len": 128, "seed": 7},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"steps": 100, "warmup_steps": 10},
        "batch": {"global_batch_size": 16, "micro_batch_size": 16},
        "parallel": {"device": "cuda"},
        "logging": {"val_samples": 16, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(run_dir),
    }
    return run_config_from_dict(apply_overrides(base, list(overrides)))


def run_on_gpus(fn: Callable, world: int, tmp_dir: Path, *args: Any) -> list[Any]:
    """Run fn(rank, *args) in `world` spawned processes, one GPU each, joined by NCCL; their results."""
    return run_distributed(fn, world, tmp_dir, *args, backend="nccl")
