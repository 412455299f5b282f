"""Failure injection for tests and benchmarks: `kill -9` of one rank at a chosen step, as a node loss looks.

The victim first wipes its node-local copies (a lost node takes its /dev/shm with it), writes the values it is
about to lose to the run directory (`truth_path`: never a recovery source, only the measurement of ||delta||,
which a real failure cannot give), marks the run as injected (so the restarted run, which passes the same step
again, does not fail again), and sends itself SIGKILL: no handler, no atexit, no flush of anything.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
import torch

from glassbox.atomic import write_json
from glassbox.checkpoints.rank_state import load_file, save_file
from glassbox.fault_tolerance.blocks import BlockId, StateAccess
from glassbox.fault_tolerance.config import FailureInjection
from glassbox.fault_tolerance.survivors import wipe

MARKER = "injected.json"


def truth_path(scar_dir: Path, rank: int, step: int) -> Path:
    return scar_dir / "injected" / f"rank{rank}_step{step:09d}.pt"


def read_truth(scar_dir: Path, rank: int, step: int) -> dict[BlockId, dict[str, torch.Tensor]] | None:
    """The victim's blocks as they were when it was killed after optimizer step `step`, if it was injected."""
    path = truth_path(scar_dir, rank, step)
    if not path.is_file():
        return None
    return {BlockId.parse(text): tensors for text, tensors in load_file(path).items()}


class FailureInjector:
    """Fires `spec` once per run directory (see the module docstring)."""

    def __init__(self, spec: FailureInjection, rank: int, scar_dir: Path, local_dir: Path):
        self.spec = spec
        self.rank = rank
        self.scar_dir = scar_dir
        self.local_dir = local_dir
        self.armed = spec.rank == rank and not (scar_dir / MARKER).exists()

    def due(self, step: int) -> bool:
        return self.armed and step == self.spec.step

    def kill(self, access: StateAccess, where: str) -> None:
        """Wipe this rank's local copies, record the state it loses, mark the run, SIGKILL this process."""
        wipe(self.local_dir)
        save_file({str(b): access.read(b) for b in access.blocks}, truth_path(self.scar_dir, self.rank, access.step))
        write_json(self.scar_dir / MARKER, {"rank": self.rank, "step": self.spec.step, "mid_save": self.spec.mid_save,
                                            "optimizer_step": access.step, "where": where,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        print(f"[scar] injected failure: kill -9 of rank {self.rank} at step {self.spec.step} ({where})",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
