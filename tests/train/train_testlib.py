"""Helpers for the training tests: a tiny run config over the shared prepared corpus, and gloo process groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from glassbox.config import apply_overrides
from glassbox.train.config import RunConfig, run_config_from_dict

# Every test process uses one thread: tests run on a small shared CPU, and spawned ranks would fight for cores.
torch.set_num_threads(1)


def tiny_dict(data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """A model small enough for seconds-long tests (hidden 64, 2 layers) on the 512-token test vocabulary."""
    return {
        "model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128, "max_seq_len": 64},
        "data": {"path": str(data_dir), "seq_len": 64, "seed": 7},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"steps": 6, "warmup_steps": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "logging": {"val_every": 3, "val_samples": 16, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(run_dir),
    }


def tiny_config(data_dir: Path, run_dir: Path, *overrides: str) -> RunConfig:
    return run_config_from_dict(apply_overrides(tiny_dict(data_dir, run_dir), list(overrides)))


def unigram_entropy(data_dir: Path) -> float:
    """Entropy (nats/token) of the training split's token frequencies: the loss of the best context-free model."""
    from glassbox.data.store import TokenStore

    store = TokenStore(data_dir)
    tokens = np.memmap(f"{store.prefix('train')}.bin", dtype=store.dtype, mode="r")
    p = np.bincount(tokens).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())
