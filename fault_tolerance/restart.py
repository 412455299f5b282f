"""What a run restarted by torchrun does: partial recovery from survivor copies, or a full rollback.

By the time this runs, the checkpoint callback has resumed every rank from the newest full checkpoint (step c),
which is the full rollback and, for a lost rank, the state its blocks fall back to. Then:
  1. Every rank says whether it holds a survivor copy and of which step (one gather). None at all: there is no
     one to keep (the whole job was lost), so the full rollback stands. Copies of different steps cannot be
     joined into one state: full rollback too, said in the log.
  2. `recovery: full` keeps the rollback (the baseline) and records how many steps are trained again.
  3. `recovery: partial`: survivors load their copy (tensors, RNG) bit for bit; the loop's counters and every
     stateful part (sampler cursor, step plan, LR schedule, callbacks) come from the lowest survivor, so no rank
     rewinds; each lost rank restores its blocks with `recover_blocks` from [block store, checkpoint c] and sets
     its Adam step count to the survivors'. Rank 0 logs one line and records the event in the manifest.
A restart is a process started with TORCHELASTIC_RESTART_COUNT > 0; a first launch never uses copies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glassbox.checkpoints.rank_state import restore_rng
from glassbox.errors import GlassboxError
from glassbox.fault_tolerance import events
from glassbox.fault_tolerance.blocks import BlockId
from glassbox.fault_tolerance.injection import read_truth
from glassbox.fault_tolerance.recovery import (
    BlockSource, CheckpointSource, RecoveryEvent, SnapshotSource, recover_blocks,
)
from glassbox.fault_tolerance.survivors import LoopSnapshot, drop_unsharded_copies, read_copy, restore_tensors

if TYPE_CHECKING:
    from glassbox.fault_tolerance.callback import ScarCallback


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _gather(cb: "ScarCallback", obj: Any) -> list[Any]:
    if cb._group is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * cb.world_size
    dist.all_gather_object(out, obj, group=cb._group)
    return out


def _broadcast(cb: "ScarCallback", obj: Any, src: int) -> Any:
    if cb._group is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cb._group)
    return box[0]


def _own_copy(cb: "ScarCallback") -> dict[str, Any] | None:
    """This rank's survivor copy, if it is one of this run, this world and this rank."""
    path = cb.local_dir / "survivor.pt"
    try:
        copy = read_copy(path)
    except GlassboxError as e:
        cb.log(f"[scar] rank {cb.rank}: ignoring its survivor copy: {e}")
        return None
    if copy is None:
        return None
    expected = (cb.rank, cb.world_size, str(cb.run_dir.resolve()))
    if (copy["rank"], copy["world_size"], copy["run_dir"]) != expected:
        cb.log(f"[scar] rank {cb.rank}: ignoring {path}: written by rank {copy['rank']} of {copy['world_size']} "
               f"for {copy['run_dir']}")
        return None
    return copy


def recover_after_restart(cb: "ScarCallback") -> LoopSnapshot | None:
    """Recover as the module docstring says; returns the loop snapshot training continues from, or None when the
    state is the checkpoint's (a first launch, or a full rollback)."""
    if restart_count() == 0:
        return None
    state = cb.state
    copy = _own_copy(cb)
    held = _gather(cb, copy["loop"]["step"] if copy is not None else None)
    survivors = [r for r, step in enumerate(held) if step is not None]
    lost = [r for r, step in enumerate(held) if step is None]
    checkpoint = cb.resumed_from
    c = state.step
    where = checkpoint.name if checkpoint is not None else "the initialization"
    if not survivors:
        cb.say(f"[scar] restart {restart_count()}: no rank kept its state; every rank rolled back to {where} "
               f"(step {c})")
        _record_full(cb, None, lost, survivors, checkpoint, c, "no survivor copies")
        return None
    steps = sorted({held[r] for r in survivors})
    if len(steps) > 1:
        cb.say(f"[scar] restart {restart_count()}: survivor copies of different steps {steps}; every rank rolled "
               f"back to {where} (step {c})")
        _record_full(cb, max(steps), lost, survivors, checkpoint, c, f"survivor copies disagree ({steps})")
        return None
    k = steps[0]
    if cb.cfg.recovery == "full":
        cb.say(f"[scar] restart {restart_count()}: rank(s) {lost} lost at step {k}; recovery full: every rank rolled "
               f"back to {where} (step {c}), steps {c + 1}..{k} are trained again")
        _record_full(cb, k, lost, survivors, checkpoint, c, "recovery: full")
        return None
    if k < c:
        raise GlassboxError(f"survivor copies are of step {k}, older than the checkpoint {where} the run resumed "
                            f"from (step {c}): they belong to another timeline")
    loop = _broadcast(cb, copy["loop"] if copy is not None and cb.rank == survivors[0] else None, survivors[0])
    _apply_loop(state, loop, copy["loop"]["rng"] if copy is not None else loop["rng"])
    if copy is not None:
        restore_tensors(cb.params, state.optimizer, copy["tensors"], str(cb.local_dir / "survivor.pt"))
        drop_unsharded_copies(state.model)
        event = None
    else:
        event = _restore_lost_rank(cb, k, lost, checkpoint)
    gathered = [e for e in _gather(cb, event) if e is not None]
    if cb.rank == 0:
        # Every rank may have kept its state (they all stopped, none died): nothing to restore then.
        merged = events.merge(gathered) if gathered else RecoveryEvent(k, [], cb.layout.to_json(), [], 0.0)
        record = events.partial_record(merged, survivors, checkpoint.name if checkpoint else None,
                                       c if checkpoint else None, _now())
        events.append_event(cb.run_dir, record)
        rework = (f", predicted rework {merged.predicted_rework:.3g}" if merged.predicted_rework is not None else "")
        delta = (f"||delta|| = {merged.delta_norm:.4g} ({merged.delta_rel:.3g} of ||theta||)"
                 if merged.delta_norm is not None else "||delta|| unknown (the lost values are gone)")
        sources = ", ".join(f"{n} from {s}" for s, n in record["sources"].items())
        saved = (f"; saved at steps {record['source_steps'][0]}..{record['source_steps'][1]}"
                 if record["source_steps"] else "")
        cb.log(f"[scar] restart {restart_count()}: partial recovery at step {k}: rank(s) {lost} lost, "
               f"{record['lost_blocks']} blocks restored ({sources or 'none'}{saved}); rank(s) {survivors} kept "
               f"their state; {delta}{rework}; training continues at step {k + 1}")
    return LoopSnapshot(**loop)


def _apply_loop(state: Any, loop: dict[str, Any], rng: dict[str, Any]) -> None:
    """The counters and stateful parts of the survivors' step, in place of the checkpoint's."""
    parts = state.stateful()
    saved = loop["stateful"]
    if "sampler" in parts:
        parts["sampler"].load_state_dict(saved["sampler"])
    for name, part in parts.items():
        if name != "sampler":
            part.load_state_dict(saved[name])
    state.step, state.samples, state.tokens = loop["step"], loop["samples"], loop["tokens"]
    state.metrics = dict(loop["metrics"])
    restore_rng(rng)


def lose_in_process(cb: "ScarCallback") -> None:
    """The injected failure without the kill: this rank's blocks restored in place from the same sources a
    restart would use (block store, newest committed checkpoint), the event recorded like a restart's. Only
    this rank changes; the others go on as survivors do."""
    from glassbox.checkpoints.layout import checkpoints_root, list_checkpoints

    k = cb.access.step
    committed = list_checkpoints(checkpoints_root(cb.run_dir))
    checkpoint = committed[-1][1] if committed else None
    before = {b: cb.access.read(b) for b in cb.access.blocks}
    event = _restore_lost_rank(cb, k, [cb.rank], checkpoint, before)
    record = events.partial_record(event, [r for r in range(cb.world_size) if r != cb.rank],
                                   checkpoint.name if checkpoint else None, committed[-1][0] if committed else None,
                                   _now())
    events.append_event(cb.run_dir, {**record, "in_process": True})
    cb.log(f"[scar] in-process failure of rank {cb.rank} after step {k}: {record['lost_blocks']} blocks restored "
           f"({record['sources']}), ||delta|| = {event.delta_norm:.4g}")


def _restore_lost_rank(cb: "ScarCallback", k: int, lost: list[int], checkpoint: Path | None,
                       truth: dict[BlockId, dict[str, torch.Tensor]] | None = None):
    """This rank's blocks from the newest source, and its Adam step count set to the survivors' `k`; `truth`
    (the values lost) defaults to what an injected victim recorded."""
    state = cb.state
    sources: list[BlockSource] = []
    if cb.store is not None:
        sources.append(cb.store)
    if checkpoint is not None:
        sources.append(CheckpointSource(checkpoint))
    else:
        sources.append(SnapshotSource.of_access("initialization", cb.access))
    truth = truth if truth is not None else read_truth(cb.dir, cb.rank, k)
    progress = _progress_norm(truth, sources[-1]) if truth is not None else None
    event = recover_blocks(cb.access, cb.access.blocks, sources, step=k, lost_ranks=lost, before=truth,
                           progress_norm=progress, log=cb.log)
    drop_unsharded_copies(state.model)
    with torch.no_grad():
        for group in state.optimizer.param_groups:
            for p in group["params"]:
                step = state.optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    step.fill_(k)
    return event


def _progress_norm(truth: dict[BlockId, dict[str, torch.Tensor]], baseline: BlockSource) -> float:
    """||theta_T - theta_{T-C}|| over the lost blocks: the values lost against the last full checkpoint's (the
    bound's denominator; known only for an injected failure)."""
    import math

    from glassbox.fault_tolerance.blocks import STATE_KEYS

    total = 0.0
    for block, now in truth.items():
        then = baseline.read(block).tensors
        total += sum(float(torch.sum((now[key].double() - then[key].double()) ** 2)) for key in STATE_KEYS)
    return math.sqrt(total)


def _record_full(cb: "ScarCallback", k: int | None, lost: list[int], survivors: list[int],
                 checkpoint: Path | None, c: int, why: str) -> None:
    if cb.rank != 0:
        return
    events.append_event(cb.run_dir, {
        "kind": events.FULL, "step": k, "lost_ranks": lost, "survivor_ranks": survivors,
        "checkpoint": checkpoint.name if checkpoint is not None else None, "checkpoint_step": c,
        "redone_steps": (k - c) if k is not None else None, "why": why, "time": _now()})
