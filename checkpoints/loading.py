"""Loading: pick the checkpoint to resume from, restore a whole TrainState, or restore chosen tensors only.

`find_resume_checkpoint` verifies hashes before anything is loaded: `auto` walks back from the newest checkpoint
to the first that verifies and says which it refused and why; an explicit path must verify or the run stops with
the bad file's name. `load_checkpoint` loads model and optimizer into whatever layout the live ones have (DCP
reshards: save under FSDP2 on 2 ranks or TP=2, load on 1), checks the data fingerprint through the sampler, and
restores counters, schedule, batch plan and RNG. `load_partial` restores a subset of tensors (by name pattern,
and optionally one dim-0 shard of each) into a live model and optimizer, leaving everything else as it is: the
primitive SCAR's partial recovery is built on.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from glassbox.checkpoints import dcp_io
from glassbox.checkpoints.checkpointer import barrier, rank_and_world
from glassbox.checkpoints.layout import DCP_DIR, LATEST, checkpoints_root, list_checkpoints
from glassbox.checkpoints.manifest import MANIFEST, CheckpointCorrupt, checked_manifest, verify
from glassbox.checkpoints.rank_state import TRAIN_STATE, load_file, restore_rng, rng_file
from glassbox.errors import GlassboxError


def _rank0_decides(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and give every rank its result, or raise its GlassboxError on every rank."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except GlassboxError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise GlassboxError(value)
    return value


def _newest_verified(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    root = checkpoints_root(run_dir)
    found = list_checkpoints(root)
    if not found:
        log(f"[checkpoint] resume auto: no checkpoint in {root}, starting fresh")
        return None
    refused = 0
    for step, path in reversed(found):
        try:
            verify(path)
        except CheckpointCorrupt as e:
            refused += 1
            log(f"[checkpoint] refusing {path.name}: {e}")
            continue
        if refused:
            log(f"[checkpoint] falling back to the previous verified checkpoint {path.name}")
        return path
    raise GlassboxError(f"resume auto: none of the {len(found)} checkpoints in {root} verifies")


def resolve_checkpoint_path(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory / checkpoints folder resolved through `latest`."""
    path = Path(path)
    if (path / MANIFEST).is_file() or path.name.startswith("step_"):
        return path
    for root in (path, checkpoints_root(path)):
        latest = root / LATEST
        if latest.is_file():
            return root / latest.read_text().strip()
    return path


def find_resume_checkpoint(run_dir: Path, resume: str, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: `auto` (newest that verifies, or None for a fresh run) or a path."""

    def choose() -> str | None:
        if resume == "auto":
            path = _newest_verified(Path(run_dir), log)
            return str(path) if path is not None else None
        path = resolve_checkpoint_path(Path(resume))
        if not path.is_dir():
            raise GlassboxError(f"checkpoint.resume: {path} is not a checkpoint directory")
        verify(path)
        return str(path)

    chosen = _rank0_decides(choose)
    return Path(chosen) if chosen is not None else None


def load_checkpoint(path: Path, state: Any, allow_data_change: bool = False, verify_hashes: bool = True) -> dict:
    """Restore `state` (model, optimizer, schedule, sampler, batch plan, counters, RNG) from checkpoint `path`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    manifest = _rank0_decides(lambda: checked_manifest(path, verify_hashes))
    run_state = load_file(path / TRAIN_STATE)
    if state.sampler is not None and run_state["sampler"] is not None:
        # First, before the heavy load: a different data fingerprint stops the resume with what changed.
        state.sampler.load_state_dict(run_state["sampler"], allow_fingerprint_change=allow_data_change)
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    content = {"model": model_sd, "optim": optim_sd}
    try:
        dcp_io.load(content, path / DCP_DIR)
    except Exception as e:      # DCP wraps per-rank failures; the message names the missing or mismatched key
        raise GlassboxError(f"{path}: cannot load model/optimizer state into this model ({e})") from None
    set_state_dict(state.model, state.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if state.lr_scheduler is not None and run_state["lr_scheduler"] is not None:
        groups = len(state.optimizer.param_groups)
        state.lr_scheduler.load_state_dict(_scheduler_for_groups(run_state["lr_scheduler"], groups, path))
    if state.batch_plan is not None and run_state["batch_plan"] is not None:
        state.batch_plan.load_state_dict(run_state["batch_plan"])
    state.step, state.samples, state.tokens = run_state["step"], run_state["samples"], run_state["tokens"]
    state.metrics = dict(run_state["metrics"])
    state.extra = dict(run_state["extra"])
    rank, world = rank_and_world()
    rng = path / rng_file(rank)
    if world != manifest.get("world_size") and not rng.is_file():
        rng = path / rng_file(0)     # a larger world than saved: new ranks start from rank 0's streams
    restore_rng(load_file(rng))
    barrier()
    return manifest


def _scheduler_for_groups(saved: dict[str, Any], groups: int, path: Path) -> dict[str, Any]:
    """An LR scheduler state for `groups` optimizer param groups.

    The optimizer's grouping can depend on the parallel layout (one group per kind of DTensor), so a resharded
    resume may see a different number of groups. DCP maps optimizer state by parameter name; the scheduler's
    per-group lists are mapped here, which is well defined when every saved group was scheduled alike.
    """
    per_group = [k for k, v in saved.items() if isinstance(v, list) and len(v) != groups]
    if not per_group:
        return saved
    fitted = dict(saved)
    for key in per_group:
        values = saved[key]
        if not values or any(v != values[0] for v in values):
            raise GlassboxError(
                f"{path}: the LR schedule has {len(values)} differently scheduled param groups, this run has "
                f"{groups}; cannot map {key}"
            )
        fitted[key] = [values[0]] * groups
    return fitted


def _chunk_rows(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Rows [start, stop) of chunk k of n along dim 0, with torch.chunk's (and FSDP2's) sizes."""
    k, count = shard
    size = -(-n // count)
    return min(k * size, n), min((k + 1) * size, n)


def _copy_rows(live: torch.Tensor, loaded: torch.Tensor, shard: tuple[int, int] | None) -> None:
    from torch.distributed.tensor import DTensor

    if shard is None:
        live.copy_(loaded)
        return
    start, stop = _chunk_rows(live.shape[0], shard)
    if isinstance(live, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(live.shape, live.device_mesh, live.placements)
        lo, hi = max(start, offset[0]), min(stop, offset[0] + shape[0])
        if lo < hi:
            live.to_local()[lo - offset[0]:hi - offset[0]].copy_(loaded.to_local()[lo - offset[0]:hi - offset[0]])
        return
    live[start:stop].copy_(loaded[start:stop])


def load_partial(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 names: Iterable[str] | None = None, shard: tuple[int, int] | None = None,
                 verify_hashes: bool = True) -> list[str]:
    """Restore the parameters matching `names` (fnmatch patterns; None: all) and their optimizer moments.

    `shard=(k, n)` restores only the k-th of n dim-0 chunks of each chosen tensor (the part FSDP2 rank k of n
    holds), for plain and DTensor parameters alike. Scalar optimizer state (Adam's step count) is left as is:
    it counts the steps the live model took. Returns the restored parameter names.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    manifest = _rank0_decides(lambda: checked_manifest(path, verify_hashes))
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise GlassboxError(f"shard {shard}: expected (k, n) with 0 <= k < n")
    model_sd = get_model_state_dict(model)
    patterns = list(names) if names is not None else ["*"]
    chosen = [fqn for fqn in model_sd if any(fnmatch.fnmatchcase(fqn, p) for p in patterns)]
    if not chosen:
        raise GlassboxError(f"no parameter matches {patterns}")
    missing = [fqn for fqn in chosen if fqn not in manifest.get("tensors", {})]
    if missing:
        raise GlassboxError(f"{path}: tensor {missing[0]!r} is not in this checkpoint")
    live: dict[str, Any] = {"model": {fqn: model_sd[fqn] for fqn in chosen}}
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)["state"]
        live["optim"] = {"state": {
            fqn: {k: v for k, v in optim_state[fqn].items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            for fqn in chosen if fqn in optim_state
        }}
    buffers = _map_tensors(live, lambda t: torch.empty_like(t))
    try:
        dcp_io.load(buffers, path / DCP_DIR)
    except Exception as e:      # DCP wraps per-rank failures
        raise GlassboxError(f"{path}: cannot load {len(chosen)} chosen tensors ({e})") from None
    with torch.no_grad():
        for target, loaded in zip(_leaves(live), _leaves(buffers)):
            _copy_rows(target, loaded, shard)
    return chosen


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return fn(tree)


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in _leaves(tree[k])]
    return [tree]
