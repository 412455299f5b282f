"""SCAR in a training run: prioritized partial checkpoints, survivor copies, restart recovery, failure injection.

`ScarCallback` is what the trainer installs when `fault_tolerance.recovery` is `full` or `partial`. Per step:
  on_after_backward .. on_optimizer_step   the update window: a SIGTERM waits until the step's update is done
  on_optimizer_step                        the loop's counters after this update (what a survivor copy holds)
  on_step_start                            an injected failure (kill -9 of rank k at step s)
  on_step_end, every r * C steps           the partial checkpoint: `BlockSelector` picks this rank's share of
                                           blocks, they are copied to host memory (the only stall) and written to
                                           the block store (RUN_DIR/scar/blocks) on a background thread
  on_train_start                           after the checkpoint callback's resume: a restart's recovery
                                           (glassbox.fault_tolerance.restart)
Its state (every rank's selector: cursor, generator, carried budget) is in every checkpoint, gathered from all
ranks at each partial save (rank 0 writes the loop state), so a resumed run selects as one that never stopped.

It implements glassbox.train.callbacks.Callback's hooks by name rather than subclassing it: the run config holds
the `fault_tolerance:` section and the trainer installs this callback, so fault_tolerance sits below train in the
import graph (as glassbox.checkpoints does) and cannot import it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from glassbox.distributed import is_distributed, rank_and_world
from glassbox.fault_tolerance.block_store import BlockStore
from glassbox.fault_tolerance.blocks import BlockId, BlockLayout, FullStateAccess, LocalShardAccess
from glassbox.fault_tolerance.config import FaultToleranceConfig
from glassbox.fault_tolerance.injection import FailureInjector
from glassbox.fault_tolerance.selection import BlockSelector
from glassbox.fault_tolerance.survivors import (
    LoopSnapshot, SurvivorGuard, drop_unsharded_copies, payload, rank_dir, snapshot_of, trainable_parameters,
    wipe,
)

BLOCKS_DIR = "blocks"


def scar_dir(run_dir: Path) -> Path:
    """RUN_DIR/scar: the block store, the injection marker and records (shared storage, like checkpoints/)."""
    return Path(run_dir) / "scar"


def build_layout(model: torch.nn.Module, cfg: FaultToleranceConfig, world_size: int) -> BlockLayout:
    if cfg.rows_per_block:
        return BlockLayout.of_model(model, world_size, rows_per_block=cfg.rows_per_block)
    return BlockLayout.of_model(model, world_size, block_elements=cfg.block_elements)


class ScarCallback:
    """See the module docstring."""

    order = -90                 # after the checkpoint callback (-100): a restart resumes from a checkpoint first
    wants_local_norms = False
    name = "scar"

    def __init__(self, cfg: FaultToleranceConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log
        self.state: Any = None
        self.rank, self.world_size = 0, 1
        self.rank_states: dict[int, dict[str, Any]] = {}
        self.saved: dict[BlockId, dict[str, torch.Tensor]] = {}
        self.snapshot: LoopSnapshot | None = None
        self.resumed_from: Path | None = None
        self.last_stall_s = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._writing: Future | None = None
        self._guard: SurvivorGuard | None = None
        self._group: Any = None

    # -- set-up -------------------------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self.rank == 0:
            self.log(message)

    def setup(self, trainer: Any) -> None:
        state = self.state = trainer.state
        self.rank, self.world_size = rank_and_world()
        self.seq_len = trainer.cfg.data.seq_len
        self.params = trainable_parameters(state.model)
        self.layout = build_layout(state.model, self.cfg, self.world_size)
        self.access = (LocalShardAccess(state.model, state.optimizer, self.layout, self.rank) if self.world_size > 1
                       else FullStateAccess(state.model, state.optimizer, self.layout))
        if is_distributed():
            import torch.distributed as dist

            # SCAR's few small object collectives run over gloo: the default group on CPUs, one of their own
            # beside NCCL (so they never queue behind training kernels).
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.dir = scar_dir(self.run_dir)
        self.local_dir = rank_dir(self.cfg.local_dir, self.run_dir, self.rank)
        self.selector = BlockSelector(self.cfg.strategy, self.cfg.fraction, self.cfg.seed + self.rank)
        self.every = self.cfg.partial_every
        self.store = BlockStore(self.dir / BLOCKS_DIR, self.layout) if self.every else None
        spec = self.cfg.injection
        self.injector = FailureInjector(spec, self.rank, self.dir, self.local_dir) if spec is not None else None

    # -- state in checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self.rank_states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank_states = {int(r): s for r, s in state["ranks"].items()}
        if self.rank in self.rank_states:
            self.selector.load_state_dict(self.rank_states[self.rank])

    # -- restart and resume -------------------------------------------------------------------------------------

    def on_resume(self, state: Any, path: Path) -> None:
        self.resumed_from = Path(path)

    def on_train_start(self, state: Any) -> None:
        from glassbox.fault_tolerance.restart import recover_after_restart

        self.saved = {b: self.access.read(b) for b in self.access.blocks}  # recovery's fallback: the resumed state
        recovered = recover_after_restart(self)
        wipe(self.local_dir)            # a copy is used once; one left from an earlier launch is stale
        self.snapshot = recovered or snapshot_of(state, state.step, state.samples, state.tokens)
        self._reload_saved()
        self._guard = SurvivorGuard(self.local_dir / "survivor.pt", self._survivor_payload, self.log)

    def _reload_saved(self) -> None:
        """The saved copies prioritized selection compares against: this rank's blocks in the store."""
        if self.store is None or self.state.step == 0:
            return
        from glassbox.fault_tolerance.blocks import BlockUnavailable

        for block in self.access.blocks:
            try:
                self.saved[block] = self.store.read(block).tensors
            except BlockUnavailable:
                continue

    def _survivor_payload(self) -> dict[str, Any] | None:
        if self.snapshot is None:
            return None
        try:
            self._finish_write()
        except Exception as e:      # a partial checkpoint cut short by the exit; the store keeps older versions
            self.log(f"[scar] rank {self.rank}: the partial checkpoint being written did not finish ({e})")
        return payload(self.snapshot, self.params, self.state.optimizer, self.rank, self.world_size, self.run_dir)

    # -- per step -----------------------------------------------------------------------------------------------

    def needs_state(self, step: int) -> bool:
        return self._partial_due(step)

    def _partial_due(self, step: int) -> bool:
        if not self.every:
            return False
        spec = self.cfg.injection
        return step % self.every == 0 or (spec is not None and spec.mid_save and spec.step == step)

    def on_step_start(self, state: Any, spec: Any, tokens: torch.Tensor) -> None:
        injection = self.cfg.injection
        if injection is not None and injection.in_process and injection.step == spec.step:
            # Every rank: gathered copies of the victim's shards, kept from a validation pass, must not be reused.
            drop_unsharded_copies(state.model)
        if self.injector is not None and not self.injector.spec.mid_save and self.injector.due(spec.step):
            self._finish_write()
            if self.injector.spec.in_process:
                from glassbox.fault_tolerance.restart import lose_in_process

                lose_in_process(self)
                self.injector.armed = False
            else:
                self.injector.kill(self.access, f"start of step {spec.step}")

    def on_after_backward(self, state: Any, grads: Any) -> None:
        if self._guard is not None:
            self._guard.in_update = True

    def on_optimizer_step(self, state: Any, spec: Any) -> None:
        previous = self.snapshot
        samples = previous.samples + spec.global_batch
        self.snapshot = snapshot_of(state, spec.step, samples, previous.tokens + spec.global_batch * self.seq_len)
        if self._guard is not None:
            self._guard.update_done()

    def on_step_end(self, state: Any) -> None:
        if self._partial_due(state.step):
            self._partial_save(state.step)

    def on_checkpoint(self, state: Any, path: Path) -> None:
        """Nothing: a restart finds the newest full checkpoint through the checkpoint callback's resume."""

    def on_train_end(self, state: Any) -> None:
        self._finish_write()
        if self._pool is not None:
            self._pool.shutdown()
        if self._guard is not None:
            self._guard.finished()
        wipe(self.local_dir)

    # -- partial checkpoints ------------------------------------------------------------------------------------

    def _finish_write(self) -> None:
        """Wait for the previous partial checkpoint's writes (their failure surfaces here)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _partial_save(self, step: int) -> None:
        started = time.perf_counter()
        self._finish_write()
        chosen = self.selector.select(self.access, self.saved)
        blocks = {b: self.access.read(b) for b in chosen}
        self.saved.update(blocks)
        self._gather_selector_states()
        if self.injector is not None and self.injector.spec.mid_save and self.injector.due(step):
            self._write_then_die(step, blocks)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="glassbox-scar")
        self._writing = self._pool.submit(self.store.write, step, blocks)
        self.last_stall_s = time.perf_counter() - started
        elements = sum(self.layout.num_elements(b) for b in chosen)
        total = sum(self.layout.num_elements(b) for b in self.access.blocks)
        self.say(f"[scar] step {step}: partial checkpoint of {len(chosen)} blocks ({elements / total:.0%} of rank "
                 f"{self.rank}'s state, {self.cfg.strategy}) writing in the background, training blocked "
                 f"{self.last_stall_s:.3f} s")

    def _write_then_die(self, step: int, blocks: dict[BlockId, dict[str, torch.Tensor]]) -> None:
        """The mid-save injection: half of this rank's blocks of this partial checkpoint are committed, then the
        process is killed before the rest."""
        items = list(blocks.items())
        half = len(items) // 2
        self.store.write(step, dict(items[:half]))
        self.injector.kill(self.access, f"step {step}, after {half} of {len(items)} blocks of its partial checkpoint")

    def _gather_selector_states(self) -> None:
        mine = self.selector.state_dict()
        if self._group is None:
            self.rank_states = {self.rank: mine}
            return
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self._group)
        self.rank_states = dict(enumerate(gathered))
