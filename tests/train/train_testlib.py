"""Helpers for the training tests: a tiny run config over the shared prepared corpus, and gloo process groups."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.multiprocessing as mp

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, tmp_dir: Path, *args: Any) -> list[Any]:
    """Run fn(rank, *args) in `world` spawned processes joined by a real gloo process group; their results."""
    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), fn, args, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
