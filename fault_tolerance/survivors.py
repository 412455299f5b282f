"""Survivor copies: what a rank that did not fail keeps across torchrun's restart of every worker.

When one rank dies, torchrun's agent stops the others (SIGTERM, then SIGKILL after a grace period) and starts all
of them again. A survivor's state is still right at that moment, so each one writes it to node-local fast storage
(/dev/shm by default: memory, gone with the node, which is exactly the lifetime needed) and the restarted
process takes it back bit for bit instead of rolling back to a checkpoint.

A copy is taken at a consistent point only: the tensors (this rank's FSDP2 local shards of every trainable
parameter, its Adam moments and step count) together with the loop's counters as they stood right after the
last optimizer step (`LoopSnapshot`, refreshed by SCAR's callback every step). The optimizer step itself is the
one window where the tensors are half-updated; a SIGTERM that arrives in it is deferred until the step is done.
A rank whose collective fails first (the dead peer's socket closes before the agent's SIGTERM arrives) writes
its copy on the way out (atexit). Files are written under a temporary name and renamed, so a copy is whole or
absent.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from glassbox.checkpoints.rank_state import capture_rng, load_file, save_file
from glassbox.errors import GlassboxError
from glassbox.models.transformer import unwrap

COPY_FILE = "survivor.pt"
FORMAT = "glassbox-scar-survivor/1"


def run_key(run_dir: Path) -> str:
    """The folder name of a run under the node-local root: its name plus a hash of its absolute path, so two
    runs on one node never share copies."""
    resolved = str(Path(run_dir).resolve())
    return f"{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def rank_dir(local_dir: str | Path, run_dir: Path, rank: int) -> Path:
    return Path(local_dir) / run_key(run_dir) / f"rank{rank}"


@dataclass
class LoopSnapshot:
    """The loop's state right after optimizer step `step`: counters, every stateful part's state (sampler, step
    plan, LR schedule, callbacks) and this rank's RNG."""

    step: int
    samples: int
    tokens: int
    metrics: dict[str, Any]
    stateful: dict[str, Any]
    rng: dict[str, Any]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, as the optimizer holds them (FSDP2's sharded DTensors). Take this
    while no forward runs: during one, FSDP2 puts unsharded tensors in the modules' place, and a survivor is
    often stopped right there (its peer died inside a collective)."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def drop_unsharded_copies(model: torch.nn.Module) -> None:
    """Make the next forward gather the sharded parameters again. FSDP2 keeps a module's gathered (unsharded)
    parameters after a forward that no backward follows (a validation pass: the root's embedding and final
    norm, say), and the next forward reuses them; blocks written into the shards in between would be skipped."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def capture_tensors(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's local shard of every trainable parameter and every tensor of its optimizer state, as CPU
    copies keyed by parameter name."""
    out = {}
    for name, p in params.items():
        entry = {"param": _local(p.detach()).to("cpu", copy=True)}
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                entry[key] = _local(value).detach().to("cpu", copy=True)
        out[name] = entry
    return out


def restore_tensors(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    tensors: dict[str, dict[str, torch.Tensor]], where: str) -> None:
    """Copy a survivor's tensors back into the live local shards and optimizer state, bit for bit."""
    if set(params) != set(tensors):
        extra = sorted(set(params) ^ set(tensors))
        raise GlassboxError(f"{where}: holds other parameters than this model ({extra[0]})")
    with torch.no_grad():
        for name, entry in tensors.items():
            p = params[name]
            target = _local(p.data)
            if tuple(target.shape) != tuple(entry["param"].shape):
                raise GlassboxError(f"{where}: {name} has local shape {tuple(entry['param'].shape)}, this rank "
                                    f"holds {tuple(target.shape)} (another world size?)")
            target.copy_(entry["param"])
            state = optimizer.state.setdefault(p, {})
            for key, value in entry.items():
                if key == "param":
                    continue
                live = state.get(key)
                if isinstance(live, torch.Tensor):
                    _local(live).copy_(value)
                else:
                    state[key] = value.clone()


def write_copy(path: Path, payload: dict[str, Any]) -> None:
    """Atomically: a temporary sibling, fsynced, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_file({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def read_copy(path: Path) -> dict[str, Any] | None:
    """A survivor copy, or None when there is none; a damaged one is an error naming the file."""
    if not path.is_file():
        return None
    data = load_file(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GlassboxError(f"{path}: not a glassbox survivor copy")
    return data


def wipe(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class SurvivorGuard:
    """Writes this rank's copy when the process is told to stop (SIGTERM) or leaves without finishing.

    `payload()` builds what is written (None: nothing consistent to write yet); `in_update` is set by the
    caller around the optimizer step, during which a SIGTERM waits; `finished()` disarms the guard.
    """

    def __init__(self, path: Path, payload: Callable[[], dict[str, Any] | None], log: Callable[[str], None]):
        self.path = path
        self.payload = payload
        self.log = log
        self.in_update = False
        self._deferred = False
        self._armed = True
        self._written = False
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        atexit.register(self._on_exit)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.in_update:
            self._deferred = True
            return
        self._write("SIGTERM")
        os._exit(128 + signal.SIGTERM)

    def update_done(self) -> None:
        """The optimizer step finished: a SIGTERM that waited for it is served now."""
        self.in_update = False
        if self._deferred:
            self._write("SIGTERM")
            os._exit(128 + signal.SIGTERM)

    def _on_exit(self) -> None:
        self._write("exit before the end of training")

    def _write(self, why: str) -> None:
        if not self._armed or self._written:
            return
        self._written = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # the agent's SIGTERM must not cut the write short
        payload = self.payload()
        if payload is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_copy(self.path, payload)
        self.log(f"[scar] {why}: kept this rank's state of step {payload['loop']['step']} in {self.path}")

    def finished(self) -> None:
        """Training ended normally: nothing to keep; the SIGTERM handler goes back to what it was."""
        self._armed = False
        atexit.unregister(self._on_exit)
        signal.signal(signal.SIGTERM, self._previous)


def payload(snapshot: LoopSnapshot, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, rank: int,
            world_size: int, run_dir: Path) -> dict[str, Any]:
    """What a survivor copy holds (plain containers and tensors: it is read back with weights_only)."""
    return {"rank": rank, "world_size": world_size, "run_dir": str(Path(run_dir).resolve()),
            "loop": dataclasses.asdict(snapshot), "tensors": capture_tensors(params, optimizer)}


def snapshot_of(state: Any, step: int, samples: int, tokens: int) -> LoopSnapshot:
    """The loop's state after optimizer step `step` (whose counters the caller tracks: the trainer counts a step
    only when it reads its metrics back, later)."""
    return LoopSnapshot(step, samples, tokens, dict(state.metrics),
                        {name: part.state_dict() for name, part in state.stateful().items()}, capture_rng())
