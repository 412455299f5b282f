"""Loading: pick the checkpoint to resume from, restore a whole training state, or restore chosen tensors only.

Everything goes through the checkpoint index (checkpoints/index.py): a checkpoint's view names, per parameter,
the directory holding its copy, so a state spread over several directories loads like one. Hashes are verified
before anything is loaded: `auto` walks back from the newest checkpoint to the first whose view verifies and says
which it refused and why; an explicit path must verify or the run stops naming the bad file or tensor.
`load_checkpoint` loads model and optimizer into whatever layout the live ones have (DCP reshards: save under
FSDP2 on 2 ranks or TP=2, load on 1), checks the data fingerprint through the sampler, and restores counters,
every stateful part (step plan, LR schedule, callbacks) and RNG. `load_partial` restores a subset of tensors (by name pattern,
and optionally one dim-0 shard of each) into a live model and optimizer, leaving everything else as it is: the
primitive SCAR's partial recovery is built on.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from glassbox.checkpoints import dcp_io
from glassbox.checkpoints.index import CheckpointIndex, StateView
from glassbox.checkpoints.layout import DCP_DIR, LATEST, checkpoints_root
from glassbox.checkpoints.manifest import MANIFEST, CheckpointCorrupt
from glassbox.checkpoints.rank_state import TRAIN_STATE, CheckpointState, load_file, restore_rng, rng_file
from glassbox.distributed import barrier, rank0_decides, rank_and_world
from glassbox.errors import GlassboxError


def _newest_verified(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    index = CheckpointIndex.of_run(run_dir)
    if not index.steps():
        log(f"[checkpoint] resume auto: no checkpoint in {index.root}, starting fresh")
        return None
    refused = 0
    for step in reversed(index.steps()):
        path = index.paths[step]
        try:
            index.view(step).verify()
        except CheckpointCorrupt as e:
            refused += 1
            log(f"[checkpoint] refusing {path.name}: {e}")
            continue
        if refused:
            log(f"[checkpoint] falling back to the previous verified checkpoint {path.name}")
        return path
    raise GlassboxError(f"resume auto: none of the {len(index.steps())} checkpoints in {index.root} verifies")


def checkpoint_view(path: Path) -> StateView:
    """The view of checkpoint directory `path` through the index of the run it belongs to."""
    path = resolve_checkpoint_path(Path(path))
    if not path.is_dir():
        raise GlassboxError(f"{path} is not a checkpoint directory")
    return CheckpointIndex.of_checkpoint(path).view_of(path)


def verified_view(path: Path, verify_hashes: bool = True) -> StateView:
    """`checkpoint_view(path)`, decided on rank 0 and, with `verify_hashes`, checked byte for byte first."""
    def check() -> StateView:
        view = checkpoint_view(path)
        if verify_hashes:
            view.verify()
        return view

    return rank0_decides(check)


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
        checkpoint_view(path).verify()
        return str(path)

    chosen = rank0_decides(choose)
    return Path(chosen) if chosen is not None else None


def _read_sources(view: StateView, model_part: dict[str, Any], optim_state: dict[str, Any] | None,
                  param_groups: Any = None) -> None:
    """Fill the tensors of `model_part` (and their moments in `optim_state`) in place, one DCP read per source
    directory of `view`; `param_groups`, if given, come from the view's own directory."""
    for path, held in view.sources().items():
        keys = [k for k in held if k in model_part]
        content: dict[str, Any] = {"model": {k: model_part[k] for k in keys}}
        if optim_state is not None:
            content["optim"] = {"state": {k: optim_state[k] for k in keys if k in optim_state}}
            if param_groups is not None and path == view.path:
                content["optim"]["param_groups"] = param_groups
        if not keys and "param_groups" not in content.get("optim", {}):
            continue
        try:
            dcp_io.load(content, path / DCP_DIR)
        except GlassboxError:
            raise
        except Exception as e:      # DCP wraps per-rank failures; the message names the missing or mismatched key
            raise GlassboxError(f"{path}: cannot load {len(keys)} tensors into this model ({e})") from None


def load_view(view: StateView, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
              ) -> dict[str, Any]:
    """Load every parameter of `view` (and, given the optimizer, its moments and param groups) into the live
    state dicts, one DCP read per source directory; returns them for `set_state_dict`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (model.state_dict(), None)
    _read_sources(view, model_sd, optim_sd["state"] if optim_sd is not None else None,
                  optim_sd["param_groups"] if optim_sd is not None else None)
    return {"model": model_sd, "optim": optim_sd}


def load_checkpoint(path: Path, state: CheckpointState, allow_data_change: bool = False,
                    verify_hashes: bool = True) -> dict:
    """Restore `state` (model, optimizer, counters, stateful parts, RNG) from checkpoint `path` and the
    checkpoints its view reads from; returns the view's manifest."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    view = verified_view(Path(path), verify_hashes)
    path = view.path
    run_state = load_file(path / TRAIN_STATE)
    parts = state.stateful()
    saved_parts = run_state["stateful"]
    if "sampler" in parts and saved_parts.get("sampler") is not None:
        # First, before the heavy load: a different data fingerprint stops the resume with what changed.
        parts["sampler"].load_state_dict(saved_parts["sampler"], allow_fingerprint_change=allow_data_change)
    loaded = load_view(view, state.model, state.optimizer)
    set_state_dict(state.model, state.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    for name, part in parts.items():
        if name == "sampler":
            continue
        if name not in saved_parts:
            raise GlassboxError(f"{path}: holds no state for {name!r} (saved: {', '.join(sorted(saved_parts))})")
        saved = saved_parts[name]
        if name == "lr_scheduler" and hasattr(part, "optimizer"):
            saved = _scheduler_for_groups(saved, len(state.optimizer.param_groups), path)
        part.load_state_dict(saved)
    state.step, state.samples, state.tokens = run_state["step"], run_state["samples"], run_state["tokens"]
    state.metrics = dict(run_state["metrics"])
    rank, world = rank_and_world()
    rng = path / rng_file(rank)
    if world != view.manifest.get("world_size") and not rng.is_file():
        rng = path / rng_file(0)     # a larger world than saved: new ranks start from rank 0's streams
    restore_rng(load_file(rng))
    barrier()
    return view.manifest


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

    view = verified_view(Path(path), verify_hashes)
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise GlassboxError(f"shard {shard}: expected (k, n) with 0 <= k < n")
    model_sd = get_model_state_dict(model)
    patterns = list(names) if names is not None else ["*"]
    chosen = [fqn for fqn in model_sd if any(fnmatch.fnmatchcase(fqn, p) for p in patterns)]
    if not chosen:
        raise GlassboxError(f"no parameter matches {patterns}")
    missing = [fqn for fqn in chosen if fqn not in view.tensors]
    if missing:
        raise GlassboxError(f"{view.path}: tensor {missing[0]!r} is not in this checkpoint")
    live: dict[str, Any] = {"model": {fqn: model_sd[fqn] for fqn in chosen}}
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)["state"]
        live["optim"] = {"state": {
            fqn: {k: v for k, v in optim_state[fqn].items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            for fqn in chosen if fqn in optim_state
        }}
    buffers = _map_tensors(live, lambda t: torch.empty_like(t))
    _read_sources(view, buffers["model"], buffers["optim"]["state"] if "optim" in buffers else None)
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
