"""Saving: the full training state on a schedule, sharded, hashed and committed atomically.

Model and optimizer go through `torch.distributed.checkpoint` exactly as they are sharded (FSDP2 / tensor
parallel DTensors, or plain tensors), keyed by parameter name, so any world size can load them back. Each rank
adds its RNG states; rank 0 adds the loop's state (step, sampler, batch plan, LR schedule, `extra`), the resolved
config and the tokenizer, so a checkpoint exports on its own. Everything is written into `step_NNNNNN.tmp/`,
fsynced, listed with sha256 hashes in MANIFEST.json, and only then renamed to `step_NNNNNN/`; `latest` moves
after the rename. A process killed at any point leaves the committed checkpoints untouched.

Async save (for GPU runs) returns once DCP has staged the tensors to host memory; files are written in the
background and the commit happens at a later step (or at the end of training). The time the training loop was
blocked is measured either way and logged.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from glassbox import __version__
from glassbox.atomic import fsync_dir, fsync_tree, write_text
from glassbox.checkpoints import dcp_io
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.layout import (
    CONFIG,
    DCP_DIR,
    LATEST,
    TOKENIZER_DIR,
    checkpoints_root,
    list_checkpoints,
    step_dir_name,
)
from glassbox.checkpoints.manifest import write_manifest
from glassbox.checkpoints.rank_state import TRAIN_STATE, capture_rng, capture_train_state, rng_file, save_file
from glassbox.checkpoints.schedule import is_scheduled, steps_to_delete
from glassbox.train.callbacks import Callback
from glassbox.train.config import data_dirs
from glassbox.models.transformer import unwrap


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dcp_io.distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dcp_io.distributed():
        dist.barrier()


def _data_dir(config: Any) -> Path | None:
    """The run's (first) DATA_DIR, whose tokenizer a checkpoint carries; None for a config without data."""
    data = getattr(config, "data", None)
    dirs = data_dirs(data) if data is not None else []
    return Path(dirs[0]) if dirs and dirs[0] else None


@dataclass
class _Pending:
    """An async save whose files are still being written."""

    future: Any
    tmp: Path
    final: Path
    info: dict[str, Any]
    started: float


class Checkpointer:
    """Writes checkpoints of a `TrainState` into RUN_DIR/checkpoints/ and applies retention."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.root = checkpoints_root(run_dir)
        self.log = log
        self.pending: _Pending | None = None
        self.last_stall_s: float | None = None
        self.last_saved_step: int | None = None
        self._async_group = None
        self._stager = None
        self._staging = None
        self._staging_hook = None

    def say(self, message: str) -> None:
        if rank_and_world()[0] == 0:
            self.log(f"[checkpoint] {message}")

    def save(self, state: Any) -> Path:
        """Checkpoint `state` at `state.step`; returns the final path (committed unless async is still writing)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        started = time.perf_counter()
        rank, world = rank_and_world()
        final = self.root / step_dir_name(state.step)
        if self.last_saved_step == state.step:
            return final
        self.last_saved_step = state.step
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            self._remove_stale_tmp()
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
        save_file(capture_rng(), tmp / rng_file(rank))
        if rank == 0:
            self._write_run_files(state, tmp)
        info = self._info(state, world)
        content = {"model": model_sd, "optim": optim_sd}
        if self.cfg.async_save:
            if self._stager is None:
                self._stager = dcp_io.make_stager()
            response = dcp_io.async_save(content, tmp / DCP_DIR, self._background_group(), self._stager)
            upload = getattr(response, "upload_completion", response)
            self.pending = _Pending(upload, tmp, final, info, started)
            self.last_stall_s = time.perf_counter() - started
            staging = getattr(response, "staging_completion", None)
            if staging is not None:
                self._hold_optimizer_until(staging, state.optimizer)
            else:
                self.say(f"step {state.step}: async save started, training blocked {self.last_stall_s:.3f} s")
            return final
        dcp_io.save(content, tmp / DCP_DIR)
        barrier()
        if rank == 0:
            self._commit(tmp, final, info, started)
        barrier()
        self.last_stall_s = time.perf_counter() - started
        return final

    def _hold_optimizer_until(self, staging: Any, optimizer: torch.optim.Optimizer) -> None:
        """The device-to-host copy overlaps the next forward/backward; the next optimizer step (the first write
        to the saved tensors) waits for it, and that wait is added to the measured stall."""
        def wait_for_staging(*_: Any) -> None:
            if self._staging is not staging:
                return
            t0 = time.perf_counter()
            staging.result()
            self._staging = None
            self.last_stall_s = (self.last_stall_s or 0.0) + time.perf_counter() - t0
            self.say(f"async save staged, training blocked {self.last_stall_s:.3f} s")

        # Removed in wait(): a hook cannot remove itself while the optimizer iterates over its hooks.
        self._staging_hook = optimizer.register_step_pre_hook(wait_for_staging)
        self._staging = staging

    def poll(self) -> None:
        """Commit a finished async save without waiting for one still running."""
        if self.pending is not None and self.pending.future.done():
            self.wait()

    def wait(self) -> None:
        """Block until the pending async save (if any) is written, then commit it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if self._staging is not None:
            self._staging.result()
            self._staging = None
        if self._staging_hook is not None:
            self._staging_hook.remove()
            self._staging_hook = None
        pending.future.result()
        if rank_and_world()[0] == 0:
            pending.info["stall_seconds"] = self.last_stall_s
            self._commit(pending.tmp, pending.final, pending.info, pending.started)

    def close(self) -> None:
        """Finish the pending async save, then free the staging buffers (pinned host memory on GPU)."""
        self.wait()
        if self._stager is not None:
            self._stager.release()
            self._stager = None

    def _background_group(self):
        """Async saves coordinate over gloo so their collectives never queue behind NCCL training kernels."""
        import torch.distributed as dist

        if not dcp_io.distributed():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _write_run_files(self, state: Any, tmp: Path) -> None:
        from glassbox.config import dump_yaml

        save_file(capture_train_state(state), tmp / TRAIN_STATE)
        if dataclasses.is_dataclass(state.config):
            (tmp / CONFIG).write_text(dump_yaml(state.config))
        data_dir = _data_dir(state.config)
        if data_dir is not None and (data_dir / "tokenizer.json").is_file():
            (tmp / TOKENIZER_DIR).mkdir()
            for name in ("tokenizer.json", "meta.json"):
                if (data_dir / name).is_file():
                    shutil.copyfile(data_dir / name, tmp / TOKENIZER_DIR / name)

    def _info(self, state: Any, world: int) -> dict[str, Any]:
        model_cfg = getattr(unwrap(state.model), "config", None)
        parallel = getattr(state.config, "parallel", None)
        return {
            "step": state.step,
            "samples": state.samples,
            "tokens": state.tokens,
            "data_fingerprint": getattr(state.sampler, "fingerprint", None),
            "world_size": world,
            "parallel": dataclasses.asdict(parallel) if dataclasses.is_dataclass(parallel) else None,
            "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else None,
            "glassbox_version": __version__,
            "async_save": self.cfg.async_save,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def _commit(self, tmp: Path, final: Path, info: dict[str, Any], started: float) -> None:
        info["tensors"] = _tensor_table(tmp / DCP_DIR, info["step"])
        info["save_seconds"] = time.perf_counter() - started
        fsync_tree(tmp)
        write_manifest(tmp, info)
        if final.exists():
            # A checkpoint of this step from a timeline that was abandoned (a resume from an earlier step, or a
            # copy that failed verification): the run that is alive now replaces it.
            self._discard(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_text(self.root / LATEST, final.name + "\n")
        self.say(f"step {info['step']}: committed {final} ({info['save_seconds']:.2f} s)")
        self._apply_retention()

    def _apply_retention(self) -> None:
        committed = dict(list_checkpoints(self.root))
        for step in steps_to_delete(list(committed), self.cfg):
            self._discard(committed[step])
            self.say(f"retention: removed step {step}")

    @staticmethod
    def _discard(path: Path) -> None:
        trash = path.with_name(path.name + ".deleting")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(path, trash)      # gone from the listing at once, even if rmtree is interrupted
        shutil.rmtree(trash)

    def _remove_stale_tmp(self) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.is_dir() and path.name.endswith((".tmp", ".deleting")):
                shutil.rmtree(path)


def _tensor_table(dcp_dir: Path, step: int) -> dict[str, Any]:
    """Per model tensor: global shape, dtype and the step its values come from (all equal in a full save)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(dcp_dir)).read_metadata()
    table = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            table[key[len("model."):]] = {"shape": list(meta.size), "dtype": str(meta.properties.dtype), "step": step}
    return table


class CheckpointCallback(Callback):
    """Resumes in `on_train_start` when `cfg.resume` is set, saves on schedule, and finishes async saves."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log
        self.checkpointer = Checkpointer(cfg, self.run_dir, log)
        self.last_step: int | None = None

    def on_train_start(self, state: Any) -> None:
        from glassbox.checkpoints.loading import find_resume_checkpoint, load_checkpoint

        schedule = getattr(state.config, "schedule", None)
        self.last_step = getattr(schedule, "steps", None)
        if self.cfg.resume:
            path = find_resume_checkpoint(self.run_dir, self.cfg.resume, self.log)
            if path is not None:
                load_checkpoint(path, state, allow_data_change=self.cfg.allow_data_change, verify_hashes=False)
                self.checkpointer.last_saved_step = state.step
                changed = self._follow_config_schedule(state)
                self.checkpointer.say(f"resumed from {path} at step {state.step}")
                if changed:
                    self.checkpointer.say(f"the LR schedule follows the run config from here: {changed}")

    @staticmethod
    def _follow_config_schedule(state: Any) -> str | None:
        from glassbox.train.lr_schedule import follow_config

        cfg = state.config
        if state.lr_scheduler is None or not hasattr(cfg, "schedule"):
            return None
        return follow_config(state.lr_scheduler, cfg.optimizer, cfg.schedule)

    def needs_state(self, step: int) -> bool:
        """True on save steps: the save must see the state exactly as that step left it."""
        return is_scheduled(step, self.cfg, self.last_step or -1)

    def on_step_end(self, state: Any) -> None:
        self.checkpointer.poll()
        if self.needs_state(state.step):
            self.checkpointer.save(state)

    def on_train_end(self, state: Any) -> None:
        if self.cfg.save_final and state.step > 0:
            self.checkpointer.save(state)
        self.checkpointer.close()
