"""The small, non-tensor-parallel part of a checkpoint: RNG states per rank and the loop's state on rank 0.

Files are written with `torch.save` and read back with `weights_only=True`, so loading a checkpoint never runs
arbitrary pickled code; everything stored is tensors, numbers, strings and containers of them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from glassbox.errors import GlassboxError

TRAIN_STATE = "train_state.pt"
RNG_DIR = "rng"


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def save_file(obj: Any, path: Path) -> None:
    """torch.save + fsync: the file is durable before the manifest that lists it is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # torch raises several types for unreadable or unsafe pickles
        raise GlassboxError(f"{path}: cannot read ({e})") from None


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as built-in numbers (numpy scalars would not load under weights_only)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, str)):
            out[key] = value
        elif isinstance(value, int):
            out[key] = int(value)
        elif isinstance(value, float):
            out[key] = float(value)
    return out


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointState(Protocol):
    """What checkpoints save and restore; glassbox.train.state.TrainState is the one the trainer keeps.

    Model and optimizer go to DCP (sharded, per tensor); the counters, the last metrics row and every part
    `stateful()` names (sampler, step plan, LR schedule, callbacks with state of their own) to train_state.pt.
    """

    config: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    samples: int
    tokens: int
    metrics: dict[str, Any]

    def stateful(self) -> dict[str, Stateful]: ...


def capture_train_state(state: CheckpointState) -> dict[str, Any]:
    """The loop's counters and the state of each stateful part (not model or optimizer: those go to DCP)."""
    return {
        "step": state.step,
        "samples": state.samples,
        "tokens": state.tokens,
        "metrics": _plain(state.metrics),
        "stateful": {name: part.state_dict() for name, part in state.stateful().items()},
    }
