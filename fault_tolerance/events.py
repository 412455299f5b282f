"""Recovery events in the run manifest, and re-applying them in a replay.

Every restart of a fault-tolerant run adds one record to RUN_DIR/manifest.json's `recovery_events`:
  kind               scar_partial_recovery (survivors kept their state; the lost ranks' blocks were restored) or
                     scar_full_rollback (every rank went back to the last full checkpoint: the baseline)
  step               the failure step: the last optimizer step the survivors completed (training goes on at +1)
  lost_ranks, survivor_ranks, lost_blocks (count), checkpoint (the last full one, its step)
  restored           per restored block: its name, its source (block_store or checkpoint step_NNNNNN), source step
  sources            blocks per source; source_steps: the oldest and newest restored step
  delta_norm, delta_rel, theta_norm, progress_norm, predicted_rework   (null where the lost values are unknown:
                     only an injected failure records them, see glassbox.fault_tolerance.injection)
  refusals           every source that could not give a block, and why
  redone_steps       for a full rollback: the steps trained again
The partial record holds what `glassbox.fault_tolerance.recovery.apply_event` needs (layout, restored blocks,
their sources and steps), so `reproduce` re-applies it after the same step and the replay stays bit-exact.

This module writes the manifest itself (atomically, keeping every other key) rather than through
glassbox.train.manifest, since fault_tolerance sits below train in the import graph.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from glassbox.atomic import write_json
from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.recovery import RecoveryEvent, predicted_rework

EVENTS_KEY = "recovery_events"
PARTIAL = "scar_partial_recovery"
FULL = "scar_full_rollback"


def _manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / "manifest.json"


def append_event(run_dir: Path, record: dict[str, Any]) -> None:
    path = _manifest_path(run_dir)
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.setdefault(EVENTS_KEY, []).append(record)
    write_json(path, manifest)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = _manifest_path(run_dir)
    if not path.is_file():
        return []
    try:
        events = json.loads(path.read_text()).get(EVENTS_KEY, [])
    except json.JSONDecodeError as e:
        raise GlassboxError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(events, list):
        raise GlassboxError(f"{path}: {EVENTS_KEY} is not a list")
    return events


def partial_events(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The partial recoveries of a run by failure step (a replay re-applies them after that step)."""
    return {int(e["step"]): e for e in read_events(run_dir) if e.get("kind") == PARTIAL}


def merge(events: list[RecoveryEvent]) -> RecoveryEvent:
    """One event from the per-rank events of the lost ranks (norms add in squares)."""
    first = events[0]

    def norm(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else math.sqrt(sum(v * v for v in values))

    theta = norm([e.theta_norm for e in events])
    delta = norm([e.delta_norm for e in events])
    progress = norm([e.progress_norm for e in events])

    return RecoveryEvent(step=first.step, lost_ranks=sorted({r for e in events for r in e.lost_ranks}),
                         layout=first.layout, restored=[r for e in events for r in e.restored],
                         theta_norm=theta or 0.0, delta_norm=delta,
                         delta_rel=delta / theta if delta is not None and theta else None,
                         progress_norm=progress, predicted_rework=predicted_rework(delta, progress),
                         refusals=[x for e in events for x in e.refusals])


def partial_record(event: RecoveryEvent, survivor_ranks: list[int], checkpoint: str | None,
                   checkpoint_step: int | None, time: str) -> dict[str, Any]:
    sources: dict[str, int] = {}
    for r in event.restored:
        sources[r.source] = sources.get(r.source, 0) + 1
    steps = [r.source_step for r in event.restored]
    return {**event.to_json(), "kind": PARTIAL, "survivor_ranks": survivor_ranks, "lost_blocks": len(event.restored),
            "checkpoint": checkpoint, "checkpoint_step": checkpoint_step, "sources": sources,
            "source_steps": [min(steps), max(steps)] if steps else None, "time": time}


def event_of(record: dict[str, Any]) -> RecoveryEvent:
    """The RecoveryEvent inside a manifest record (the extra summary fields dropped)."""
    fields = ("step", "lost_ranks", "layout", "restored", "theta_norm", "delta_norm", "delta_rel", "progress_norm",
              "predicted_rework", "refusals")
    return RecoveryEvent.from_json({k: record[k] for k in fields if k in record})


def reapply(model: Any, optimizer: Any, record: dict[str, Any], run_dir: Path, rank: int, world_size: int) -> int:
    """Re-apply a recorded partial recovery to a replay's live state: this process's share of the restored
    blocks, each read again from its recorded source and step (the block store pins the versions a recovery
    used; the checkpoint must still exist). Returns the number of blocks written here."""
    import dataclasses

    from glassbox.fault_tolerance.block_store import BlockStore
    from glassbox.fault_tolerance.blocks import BlockId, BlockLayout, FullStateAccess, LocalShardAccess
    from glassbox.fault_tolerance.recovery import BlockSource, CheckpointSource, apply_event
    from glassbox.fault_tolerance.survivors import drop_unsharded_copies

    event = event_of(record)
    layout = BlockLayout.from_json(event.layout)
    drop_unsharded_copies(model)       # first: the access must see the shards, not a validation's gathered copy
    access = (LocalShardAccess(model, optimizer, layout, rank) if world_size > 1
              else FullStateAccess(model, optimizer, layout))
    held = set(access.blocks)
    mine = dataclasses.replace(event, restored=[r for r in event.restored if BlockId.parse(r.block) in held])
    sources: list[BlockSource] = [BlockStore(Path(run_dir) / "scar" / "blocks", layout)]
    if record.get("checkpoint"):
        sources.append(CheckpointSource(Path(run_dir) / "checkpoints" / record["checkpoint"]))
    apply_event(access, mine, sources)
    return len(mine.restored)
