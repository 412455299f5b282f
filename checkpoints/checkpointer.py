"""Saving: the training state, or any subset of its tensors, sharded, hashed and committed atomically.

Model and optimizer go through `torch.distributed.checkpoint` exactly as they are sharded (FSDP2 / tensor
parallel DTensors, or plain tensors), keyed by parameter name, so any world size can load them back. `save(state,
keys=...)` writes only the chosen parameters (each with its optimizer moments); the manifest points every other
parameter at the checkpoint holding its newest copy (checkpoints/index.py). By default a save holds every
parameter that can have changed since it was last saved: all of them, except frozen ones (requires_grad off)
already saved once. Each rank adds its RNG states; rank 0 adds the loop's state (counters and every stateful
part: sampler, step plan, LR schedule, callbacks), the resolved config and the tokenizer. Everything is written into `step_NNNNNN.tmp/`,
fsynced, listed with sha256 hashes in MANIFEST.json, and only then renamed to `step_NNNNNN/`; `latest` moves
after the rename. A process killed at any point leaves the committed checkpoints untouched.

Async save (for GPU runs) returns once DCP has staged the tensors to host memory; files are written in the
background and the commit happens at a later step (or at the end of training). The time the training loop was
blocked is measured either way and logged.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
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
    CHAT_FILES,
    LATEST,
    TOKENIZER_DIR,
    checkpoints_root,
    step_dir_name,
)
from glassbox.checkpoints.index import CheckpointIndex, StateView
from glassbox.checkpoints.manifest import write_manifest
from glassbox.checkpoints.rank_state import (
    TRAIN_STATE,
    CheckpointState,
    capture_rng,
    capture_train_state,
    rng_file,
    save_file,
)
from glassbox.checkpoints.schedule import steps_to_delete
from glassbox.distributed import barrier, is_distributed, rank_and_world
from glassbox.errors import GlassboxError
from glassbox.models.transformer import unwrap


@dataclass
class _Pending:
    """An async save whose files are still being written."""

    future: Any
    tmp: Path
    final: Path
    info: dict[str, Any]
    references: dict[str, dict[str, Any]]
    started: float


def _parameter_names(model: torch.nn.Module, model_sd: dict[str, Any]) -> dict[str, str]:
    """State-dict key -> the name of the parameter it is (a tied LM head maps to the embedding's name), so
    aliases of one tensor are always saved together."""
    params = dict(unwrap(model).named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in unwrap(model).named_parameters()}
    return {key: canonical.get(id(params[key]), key) if key in params else key for key in model_sd}


def _frozen(model: torch.nn.Module) -> set[str]:
    return {n for n, p in unwrap(model).named_parameters(remove_duplicate=False) if not p.requires_grad}


class CheckpointWriteError(GlassboxError):
    """A checkpoint could not be written (disk full, file too large, I/O error); nothing of it was committed."""


def _root_cause(error: BaseException) -> str:
    """The OSError behind DCP's wrapped per-rank exceptions, or the error's own first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return f"{type(seen).__name__}: {seen.strerror or seen}"
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for marker in ("No space left on device", "File too large", "Disk quota exceeded", "Input/output error"):
        if marker in text:
            return marker
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Checkpointer:
    """Writes checkpoints of a training state into RUN_DIR/checkpoints/ and applies retention.

    `tokenizer_dir` (a prepared DATA_DIR) is copied into every checkpoint so each exports on its own, with
    `chat_dir`'s (the init_from directory's) chat template and special tokens where the run started from one.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, log: Callable[[str], None] = print,
                 tokenizer_dir: Path | None = None, chat_dir: Path | None = None):
        self.cfg = cfg
        self.root = checkpoints_root(run_dir)
        self.log = log
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.chat_dir = Path(chat_dir) if chat_dir else None
        self.pending: _Pending | None = None
        self.last_stall_s: float | None = None
        self.last_saved_step: int | None = None
        self.last_path: Path | None = None
        # Per parameter, the newest committed copy {"step", "sha256"} (known on rank 0, which writes manifests),
        # and on every rank the names that have a copy at all (the same everywhere: it decides what is saved).
        self.copies: dict[str, dict[str, Any]] = {}
        self.saved_names: set[str] = set()
        self._names_before_save: set[str] = set()
        self._async_group = None
        self._stager = None
        self._staging = None
        self._staging_hook = None

    def say(self, message: str) -> None:
        if rank_and_world()[0] == 0:
            self.log(f"[checkpoint] {message}")

    def adopt(self, view: StateView) -> None:
        """Continue from a restored checkpoint: its copies are what later partial saves refer to."""
        self.copies = {name: {"step": src.step, "sha256": src.entry["sha256"]} for name, src in view.tensors.items()}
        self.saved_names = set(view.tensors)
        self.last_saved_step = view.step
        self.last_path = view.path

    def save(self, state: CheckpointState, keys: list[str] | None = None) -> Path:
        """Checkpoint `state` at `state.step`; returns the final path (committed unless async is still writing).

        `keys`: the parameters to write (names or fnmatch patterns; each with its optimizer moments and tied
        aliases); None writes every parameter that can have changed since its last save.
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        started = time.perf_counter()
        rank, world = rank_and_world()
        final = self.root / step_dir_name(state.step)
        if self.last_saved_step == state.step:
            return final
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
        names = _parameter_names(state.model, model_sd)
        frozen = _frozen(state.model)
        chosen = self._choose(names, frozen, keys)
        self.last_saved_step = state.step
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            self._remove_stale_tmp()
            tmp.mkdir(parents=True)
        barrier()
        failure = None
        try:
            save_file(capture_rng(), tmp / rng_file(rank))
            if rank == 0:
                self._write_run_files(state, tmp)
        except OSError as e:
            failure = e
        if not self._all_ranks_ok(failure is None):
            self._abandon(tmp, state.step, failure or OSError("another rank failed to write its files"))
        references = {key: self.copies[key] for key in model_sd if key not in chosen and key in self.copies}
        info = self._info(state, world, exact=all(names[key] in frozen for key in model_sd if key not in chosen))
        content = {
            "model": {k: v for k, v in model_sd.items() if k in chosen},
            "optim": {"state": {k: v for k, v in optim_sd["state"].items() if k in chosen},
                      "param_groups": optim_sd["param_groups"]},
        }
        self._names_before_save = set(self.saved_names)
        self.saved_names |= set(chosen)
        if self.cfg.async_save:
            if self._stager is None:
                self._stager = dcp_io.make_stager()
            response = dcp_io.async_save(content, tmp / DCP_DIR, self._background_group(), self._stager)
            upload = getattr(response, "upload_completion", response)
            self.pending = _Pending(upload, tmp, final, info, references, started)
            self.last_stall_s = time.perf_counter() - started
            staging = getattr(response, "staging_completion", None)
            if staging is not None:
                self._hold_optimizer_until(staging, state.optimizer)
            else:
                self.say(f"step {state.step}: async save started, training blocked {self.last_stall_s:.3f} s")
            return final
        try:
            dcp_io.save(content, tmp / DCP_DIR)
            barrier()
            if rank == 0:
                self._commit(tmp, final, info, references, started)
        except Exception as e:      # DCP raises on every rank, wrapping the writer threads' OSError
            self._abandon(tmp, state.step, e)
        barrier()
        self.last_path = final
        self.last_stall_s = time.perf_counter() - started
        return final

    def _choose(self, names: dict[str, str], frozen: set[str], keys: list[str] | None) -> set[str]:
        """The state-dict keys this save writes: the asked-for parameters with their aliases, or by default all
        but frozen ones that have a copy already. A parameter never saved before must be written now."""
        if keys is None:
            wanted = {n for n in names.values() if n not in frozen or n not in self.saved_names}
        else:
            wanted = {n for n in names.values() if any(fnmatch.fnmatchcase(n, k) for k in keys)}
            if not wanted:
                raise GlassboxError(f"checkpoint save: no parameter matches {keys}")
        unsaved = sorted(n for n in set(names.values()) - wanted if n not in self.saved_names)
        if unsaved:
            raise GlassboxError(f"checkpoint save: {unsaved[0]} has no earlier copy, so this checkpoint must hold "
                                "it (the first save of a run holds every tensor)")
        return {key for key, name in names.items() if name in wanted}

    def _all_ranks_ok(self, ok: bool) -> bool:
        """Whether every rank's `ok` is True (one small gloo collective, so a rank that failed to write its files
        stops every rank, rather than leaving the others in DCP's save)."""
        import torch.distributed as dist

        if not is_distributed():
            return ok
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._background_group())
        return bool(flag.item())

    def _abandon(self, tmp: Path, step: int, error: Exception) -> None:
        """A save that failed: remove its partial directory (the committed checkpoints are untouched) and raise
        one CheckpointWriteError saying which checkpoint, why, and how much room there is."""
        if rank_and_world()[0] == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        self.last_saved_step = None
        self.saved_names = self._names_before_save     # what this save would have added has no copy
        free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        previous = _tree_bytes(self.last_path) if self.last_path is not None and self.last_path.is_dir() else None
        need = f", the previous checkpoint took {previous / 2**20:.1f} MiB" if previous else ""
        raise CheckpointWriteError(
            f"checkpoint of step {step}: writing {tmp} failed ({_root_cause(error)}); {free / 2**20:.1f} MiB free "
            f"there{need}. The partial directory was removed; the committed checkpoints are intact.") from None

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
        try:
            pending.future.result()
            if rank_and_world()[0] == 0:
                pending.info["stall_seconds"] = self.last_stall_s
                self._commit(pending.tmp, pending.final, pending.info, pending.references, pending.started)
        except Exception as e:      # the background writers' failure surfaces here
            self._abandon(pending.tmp, pending.info["step"], e)

    def close(self) -> None:
        """Finish the pending async save, then free the staging buffers (pinned host memory on GPU)."""
        self.wait()
        if self._stager is not None:
            self._stager.release()
            self._stager = None

    def _background_group(self):
        """The checkpointer's own collectives (async saves, agreeing on a failed write) run over gloo, so they never
        queue behind NCCL training kernels."""
        import torch.distributed as dist

        if not is_distributed():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _write_run_files(self, state: CheckpointState, tmp: Path) -> None:
        from glassbox.config import dump_yaml

        save_file(capture_train_state(state), tmp / TRAIN_STATE)
        if dataclasses.is_dataclass(state.config):
            (tmp / CONFIG).write_text(dump_yaml(state.config))
        if self.tokenizer_dir is not None and (self.tokenizer_dir / "tokenizer.json").is_file():
            (tmp / TOKENIZER_DIR).mkdir()
            for name in ("tokenizer.json", "meta.json"):
                if (self.tokenizer_dir / name).is_file():
                    shutil.copyfile(self.tokenizer_dir / name, tmp / TOKENIZER_DIR / name)
            for name in CHAT_FILES if self.chat_dir is not None else ():
                if (self.chat_dir / name).is_file():
                    shutil.copyfile(self.chat_dir / name, tmp / TOKENIZER_DIR / name)

    def _info(self, state: CheckpointState, world: int, exact: bool) -> dict[str, Any]:
        model_cfg = getattr(unwrap(state.model), "config", None)
        parallel = getattr(state.config, "parallel", None)
        return {
            "step": state.step,
            "samples": state.samples,
            "tokens": state.tokens,
            "exact": exact,
            "data_fingerprint": getattr(getattr(state, "sampler", None), "fingerprint", None),
            "world_size": world,
            "parallel": dataclasses.asdict(parallel) if dataclasses.is_dataclass(parallel) else None,
            "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else None,
            "glassbox_version": __version__,
            "async_save": self.cfg.async_save,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def _commit(self, tmp: Path, final: Path, info: dict[str, Any], references: dict[str, dict[str, Any]],
                started: float) -> None:
        info["save_seconds"] = time.perf_counter() - started
        fsync_tree(tmp)
        manifest = write_manifest(tmp, info, references)
        if final.exists():
            # A checkpoint of this step from a timeline that was abandoned (a resume from an earlier step, or a
            # copy that failed verification): the run that is alive now replaces it.
            self._discard(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_text(self.root / LATEST, final.name + "\n")
        self.copies = {name: {"step": t["step"], "sha256": t["sha256"]} for name, t in manifest["tensors"].items()}
        self.last_path = final
        held = sum(1 for t in manifest["tensors"].values() if t["step"] == info["step"])
        part = "" if held == len(manifest["tensors"]) else f", {held} of {len(manifest['tensors'])} tensors"
        self.say(f"step {info['step']}: committed {final} ({info['save_seconds']:.2f} s{part})")
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete what the schedule lets go, except checkpoints that a kept one reads tensors from."""
        index = CheckpointIndex(self.root)
        doomed = steps_to_delete(index.steps(), self.cfg)
        needed = index.needed_steps([s for s in index.steps() if s not in doomed])
        for step in doomed:
            if step in needed:
                continue
            self._discard(index.paths[step])
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
