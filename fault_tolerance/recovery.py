"""Partial recovery: put back only the lost blocks, each from the newest copy any source still holds.

SCAR's point (ALGORITHMS.md): a failure plus its recovery perturbs the state by delta = x_restored - x_lost, and
the extra iterations it costs grow like log(1 + ||delta|| / ||x(T) - x*||). Survivors keep their current values
(delta is zero there), and each lost block comes from whichever source saved it last: the prioritized block store
or the last full checkpoint. A source that cannot give a block (never saved it, a file missing, a checksum that
does not match) is refused with the reason, and the next one is used.

Each recovery is a `RecoveryEvent`: the step, the lost ranks, the source and source step of every restored block,
||delta|| (when the lost values are known, as in the benchmark; null in a real failure, where they are gone),
||theta|| and the bound's predicted rework with its inputs. `apply_event` re-applies a recorded event, reading the
same versions from the same sources, so a replay of a run with recoveries is bit-exact.

Full rollback is not here: it is the ordinary checkpoint resume (glassbox.checkpoints.loading).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.blocks import (
    MOMENT_KEYS, STATE_KEYS, BlockId, BlockLayout, BlockUnavailable, SavedBlock, StateAccess,
)


class BlockSource(Protocol):
    """Somewhere a saved version of a block may be read from: the newest it holds, or the version of `step`."""

    name: str

    def read(self, block: BlockId, step: int | None = None) -> SavedBlock: ...

    def pin(self, block: BlockId, step: int) -> None: ...


class SnapshotSource:
    """Blocks held in memory, all of one step (the benchmark's full checkpoints, taken from a live state)."""

    def __init__(self, name: str, step: int, blocks: Mapping[BlockId, Mapping[str, torch.Tensor]]):
        self.name = name
        self.step = step
        self.blocks = {b: {k: t.detach().to("cpu", torch.float32).clone() for k, t in ts.items()}
                       for b, ts in blocks.items()}

    @classmethod
    def of_access(cls, name: str, access: StateAccess) -> "SnapshotSource":
        return cls(name, access.step, {b: access.read(b) for b in access.blocks})

    def read(self, block: BlockId, step: int | None = None) -> SavedBlock:
        if block not in self.blocks:
            raise BlockUnavailable(block, self.name, "not in this snapshot")
        if step is not None and step != self.step:
            raise BlockUnavailable(block, self.name, f"holds step {self.step}, not {step}")
        return SavedBlock(self.step, {k: t.clone() for k, t in self.blocks[block].items()})

    def pin(self, block: BlockId, step: int) -> None:
        """Nothing to do: a snapshot never changes."""


class CheckpointSource:
    """Rows of a full glassbox checkpoint, read per tensor through its view (checkpoints/index.py).

    Each parameter's weight and moments are read once, from the directory the view names for it (a partial
    checkpoint's view may point elsewhere), after their bytes are checked against the manifest's hashes; a block
    then costs a slice. The block's step is that tensor's recorded step. Reads are local to this process (no
    collective), since only the lost rank reads.
    """

    def __init__(self, checkpoint_dir: Path, verify_hashes: bool = True):
        self.path = Path(checkpoint_dir)
        self.name = f"checkpoint {self.path.name}"
        self.verify_hashes = verify_hashes
        self._view: Any = None
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._checked_dirs: set[Path] = set()

    @property
    def step(self) -> int:
        return self.view().step

    def view(self) -> Any:
        if self._view is None:
            from glassbox.checkpoints.loading import checkpoint_view

            self._view = checkpoint_view(self.path)
        return self._view

    def _check_dir(self, path: Path) -> None:
        from glassbox.checkpoints.index import DCP_METADATA
        from glassbox.checkpoints.manifest import CheckpointCorrupt, read_manifest
        from glassbox.file_table import check_table

        if path in self._checked_dirs:
            return
        manifest = read_manifest(path)
        check = check_table(path, {DCP_METADATA: manifest["files"][DCP_METADATA]})
        if not check.ok:
            raise CheckpointCorrupt(f"{path / DCP_METADATA}: {check.problems()[0]}")
        self._checked_dirs.add(path)

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        from glassbox.checkpoints import dcp_io
        from glassbox.checkpoints.layout import DCP_DIR
        from glassbox.checkpoints.manifest import held_entries, verify_entries

        view = self.view()
        if name not in view.tensors:
            raise GlassboxError(f"tensor {name} is not in this checkpoint")
        source = view.tensors[name]
        if self.verify_hashes:
            self._check_dir(source.path)
            verify_entries(source.path, {f"{name}.{part}": e for part, e in held_entries(source.entry).items()})
        metadata = dcp_io.read_metadata(source.path / DCP_DIR).state_dict_metadata

        def empty(key: str) -> torch.Tensor | None:
            meta = metadata.get(key)
            return None if meta is None else torch.empty(tuple(meta.size), dtype=meta.properties.dtype)

        model = {name: empty(f"model.{name}")}
        moments = {k: empty(f"optim.state.{name}.{k}") for k in MOMENT_KEYS}
        content: dict[str, Any] = {"model": model}
        present = {k: t for k, t in moments.items() if t is not None}
        if present:
            content["optim"] = {"state": {name: present}}
        dcp.load(content, storage_reader=dcp_io.safe_reader(source.path / DCP_DIR), no_dist=True)
        weight = model[name].float()
        return {"param": weight, **{k: (present[k].float() if k in present else torch.zeros_like(weight))
                                    for k in MOMENT_KEYS}}

    def pin(self, block: BlockId, step: int) -> None:
        """Nothing to do: a committed checkpoint never changes (retention must keep it for `reproduce`)."""

    def read(self, block: BlockId, step: int | None = None) -> SavedBlock:
        try:
            if block.name not in self._tensors:
                self._tensors[block.name] = self._load(block.name)
            full = self._tensors[block.name]
            saved_step = self.view().tensors[block.name].step
        except GlassboxError as e:
            raise BlockUnavailable(block, str(self.path), str(e)) from None
        if block.stop > full["param"].shape[0]:
            raise BlockUnavailable(block, str(self.path), f"{block.name} has only {full['param'].shape[0]} rows")
        if step is not None and step != saved_step:
            raise BlockUnavailable(block, str(self.path), f"holds {block.name} of step {saved_step}, not {step}")
        return SavedBlock(saved_step, {k: t[block.start:block.stop].clone() for k, t in full.items()})


@dataclass
class RestoredBlock:
    block: str
    source: str
    source_step: int


@dataclass
class RecoveryEvent:
    """One partial recovery, as recorded in the run manifest (see the module docstring)."""

    step: int
    lost_ranks: list[int]
    layout: dict[str, Any]
    restored: list[RestoredBlock]
    theta_norm: float
    delta_norm: float | None = None
    delta_rel: float | None = None
    progress_norm: float | None = None      # ||theta_T - theta_{T-C}||, the bound's denominator
    predicted_rework: float | None = None   # log(1 + delta_norm / progress_norm)
    refusals: list[str] = field(default_factory=list)

    def source_steps(self) -> dict[BlockId, int]:
        return {BlockId.parse(r.block): r.source_step for r in self.restored}

    def to_json(self) -> dict[str, Any]:
        return {"kind": "scar_partial_recovery", **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RecoveryEvent":
        try:
            fields = {k: v for k, v in data.items() if k != "kind"}
            fields["restored"] = [RestoredBlock(**r) for r in fields["restored"]]
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise GlassboxError(f"not a recovery event record ({type(e).__name__}: {e})") from None


def state_norm(tensors: Mapping[BlockId, Mapping[str, torch.Tensor]]) -> float:
    """||x|| over the parameter rows and both moments of the given blocks."""
    return math.sqrt(sum(float(torch.sum(t[k].double() ** 2)) for t in tensors.values() for k in STATE_KEYS))


def predicted_rework(delta_norm: float | None, progress_norm: float | None) -> float | None:
    """SCAR's bound, in units of the contraction's log: log(1 + ||delta|| / ||theta_T - theta_{T-C}||)."""
    if delta_norm is None or progress_norm is None or progress_norm <= 0:
        return None
    return math.log1p(delta_norm / progress_norm)


def _newest(block: BlockId, sources: list[BlockSource], log: Callable[[str], None],
            refusals: list[str]) -> tuple[BlockSource, SavedBlock]:
    best: tuple[BlockSource, SavedBlock] | None = None
    for source in sources:
        try:
            saved = source.read(block)
        except BlockUnavailable as e:
            refusals.append(str(e))
            log(f"[scar] refusing {source.name} for {block}: {e.why}")
            continue
        if best is None or saved.step > best[1].step:
            best = (source, saved)
    if best is None:
        raise GlassboxError(f"block {block}: no source can restore it ({'; '.join(refusals[-len(sources):])})")
    return best


def recover_blocks(access: StateAccess, lost: list[BlockId], sources: list[BlockSource], step: int,
                   lost_ranks: list[int], before: Mapping[BlockId, Mapping[str, torch.Tensor]] | None = None,
                   progress_norm: float | None = None, log: Callable[[str], None] = print) -> RecoveryEvent:
    """Write the newest readable version of every lost block into `access`; see the module docstring.

    `before` (the lost blocks' values at the failure, when known) gives ||delta||; `progress_norm` (||theta_T -
    theta_{T-C}||, when known) gives the predicted rework.
    """
    if not sources:
        raise GlassboxError("partial recovery needs at least one block source")
    restored, refusals, values = [], [], {}
    for block in lost:
        source, saved = _newest(block, sources, log, refusals)
        access.write(block, saved.tensors)
        source.pin(block, saved.step)
        restored.append(RestoredBlock(str(block), source.name, saved.step))
        values[block] = saved.tensors
    delta = None
    if before is not None:
        delta = math.sqrt(sum(float(torch.sum((values[b][k].double() - before[b][k].double()) ** 2))
                              for b in lost for k in STATE_KEYS))
    theta = state_norm({b: access.read(b) for b in access.blocks})
    counts: dict[str, int] = {}
    for r in restored:
        counts[r.source] = counts.get(r.source, 0) + 1
    log(f"[scar] step {step}: restored {len(lost)} blocks of rank(s) {lost_ranks} ("
        + ", ".join(f"{n} from {s}" for s, n in counts.items()) + ")"
        + (f", ||delta|| = {delta:.4g} ({delta / theta:.3g} of ||theta||)" if delta is not None and theta else ""))
    return RecoveryEvent(step=step, lost_ranks=list(lost_ranks), layout=access.layout.to_json(), restored=restored,
                         theta_norm=theta, delta_norm=delta,
                         delta_rel=delta / theta if delta is not None and theta > 0 else None,
                         progress_norm=progress_norm, predicted_rework=predicted_rework(delta, progress_norm),
                         refusals=refusals)


def apply_event(access: StateAccess, event: RecoveryEvent, sources: list[BlockSource]) -> None:
    """Re-apply a recorded recovery: each block from the recorded source's version of the recorded step (kept
    there by `pin`; else a GlassboxError names the block), so the replayed state is bit-identical."""
    if BlockLayout.from_json(event.layout) != access.layout:
        raise GlassboxError(f"recovery event of step {event.step}: recorded for another block layout")
    by_name = {s.name: s for s in sources}
    for r in event.restored:
        block = BlockId.parse(r.block)
        if r.source not in by_name:
            raise GlassboxError(f"recovery event of step {event.step}: block {block} came from {r.source}, which "
                                f"is not among the sources given ({', '.join(by_name) or 'none'})")
        try:
            saved = by_name[r.source].read(block, r.source_step)
        except BlockUnavailable as e:
            raise GlassboxError(f"recovery event of step {event.step}: cannot re-read {block}: {e}") from None
        access.write(block, saved.tensors)
