"""The checkpoint index: for a checkpoint of step s, where each tensor of the training state is to be read from.

A checkpoint directory holds the loop state of its step and any subset of the parameters (with their optimizer
moments); its manifest says, for each parameter it does not hold, the step of the checkpoint that holds the
newest copy and that copy's sha256 (checkpoints/manifest.py). `CheckpointIndex.view(step)` follows those
references to a `StateView`: one source directory per parameter, each reference checked (the directory is
there, holds the parameter, with the recorded hash), so a directory replaced since (a resumed run that re-saved
a step) or deleted by hand is caught before anything is read. Resume, export, verify, release and retention all
go through a view; a checkpoint that holds everything is the common case of the same path, a view with one
source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassbox.checkpoints.layout import DCP_DIR, checkpoints_root, list_checkpoints
from glassbox.checkpoints.manifest import CheckpointCorrupt, held_entries, read_manifest, verify, verify_entries
from glassbox.file_table import check_table

DCP_METADATA = f"{DCP_DIR}/.metadata"


@dataclass(frozen=True)
class TensorSource:
    """Where one parameter (weight and optimizer moments) of a state is stored."""

    name: str
    step: int              # the step its values are from
    path: Path             # the checkpoint directory holding them
    entry: dict[str, Any]  # that directory's manifest entry (shape, dtype, chunks, optimizer moments)


@dataclass
class StateView:
    """The training state as of one checkpoint: the loop state of `path` and a source for every parameter."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, TensorSource]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def exact(self) -> bool:
        """True when every parameter not held here was unchanged since its copy (frozen): the view is the state
        at `step` exactly. False for a partial checkpoint of changing tensors (SCAR's), whose view mixes steps."""
        return bool(self.manifest.get("exact", True))

    def sources(self) -> dict[Path, list[str]]:
        """Parameter names to read, per source directory (the head directory first)."""
        out: dict[Path, list[str]] = {self.path: []}
        for name, src in sorted(self.tensors.items()):
            out.setdefault(src.path, []).append(name)
        return out

    def steps(self) -> set[int]:
        return {src.step for src in self.tensors.values() if src.path != self.path} | {self.step}

    def verify(self) -> None:
        """Check every byte this view would load; CheckpointCorrupt names the file, and the tensor if it is one.

        The head directory is checked whole (its loop state, RNG, config and tokenizer too); another source
        only in the bytes of the tensors taken from it, plus the DCP metadata that locates them.
        """
        verify_directory(self.path)
        for path, names in self.sources().items():
            if path == self.path:
                continue
            manifest = read_manifest(path)
            check = check_table(path, {DCP_METADATA: manifest["files"][DCP_METADATA]})
            if not check.ok:
                raise CheckpointCorrupt(f"{path / DCP_METADATA}: {check.problems()[0]}")
            verify_entries(path, {f"{name}.{part}": e for name in names
                                  for part, e in held_entries(self.tensors[name].entry).items()})


def verify_directory(path: Path) -> dict[str, Any]:
    """`verify(path)`; when a DCP shard file is bad, the error also names the tensor whose bytes are wrong."""
    try:
        return verify(path)
    except CheckpointCorrupt as file_error:
        manifest = read_manifest(path)
        entries = {f"{name}.{part}": e for name, t in manifest.get("tensors", {}).items()
                   for part, e in held_entries(t).items()}
        entries.update(manifest.get("objects", {}))
        bad_file = str(file_error)
        suspects = {n: e for n, e in entries.items() if any(f"{path / c[0]}" in bad_file for c in e["chunks"])}
        if suspects:
            verify_entries(path, suspects)
        raise


class CheckpointIndex:
    """The committed checkpoints of one run (RUN_DIR/checkpoints/) and the views they resolve to."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.paths: dict[int, Path] = dict(list_checkpoints(self.root))
        self._manifests: dict[int, dict[str, Any]] = {}

    @classmethod
    def of_run(cls, run_dir: Path) -> "CheckpointIndex":
        return cls(checkpoints_root(run_dir))

    @classmethod
    def of_checkpoint(cls, path: Path) -> "CheckpointIndex":
        """The index of the run a checkpoint directory belongs to (its siblings hold what it references); a
        directory outside a run's checkpoints folder (a release branch's training state) stands alone."""
        path = Path(path)
        index = cls(path.parent)
        if path.resolve() not in {p.resolve() for p in index.paths.values()}:
            index.paths = {int(read_manifest(path)["step"]): path}
        return index

    def steps(self) -> list[int]:
        return sorted(self.paths)

    def manifest(self, step: int) -> dict[str, Any]:
        if step not in self._manifests:
            if step not in self.paths:
                raise CheckpointCorrupt(f"{self.root}: no committed checkpoint of step {step}")
            self._manifests[step] = read_manifest(self.paths[step])
        return self._manifests[step]

    def view(self, step: int) -> StateView:
        """Resolve every parameter of checkpoint `step`; a reference that cannot be followed is CheckpointCorrupt
        naming the parameter and the checkpoint it points to."""
        head = self.paths.get(step)
        manifest = self.manifest(step)
        tensors = {}
        for name, ref in manifest.get("tensors", {}).items():
            source_step = int(ref["step"])
            if "chunks" in ref:        # held here (from this step, or of its own step in a consolidated copy)
                tensors[name] = TensorSource(name, source_step, head, ref)
                continue
            try:
                source = self.manifest(source_step)
            except CheckpointCorrupt as e:
                raise CheckpointCorrupt(f"{head}: tensor {name} comes from step {source_step}, which is not "
                                        f"readable ({e})") from None
            entry = source.get("tensors", {}).get(name)
            if entry is None or int(entry["step"]) != source_step:
                raise CheckpointCorrupt(f"{head}: tensor {name} comes from {self.paths[source_step]}, which does "
                                        "not hold it")
            if entry.get("sha256") != ref.get("sha256"):
                raise CheckpointCorrupt(f"{head}: tensor {name} comes from {self.paths[source_step]}, whose copy "
                                        "has another sha256 (that checkpoint was replaced since)")
            tensors[name] = TensorSource(name, source_step, self.paths[source_step], entry)
        return StateView(head, manifest, tensors)

    def view_of(self, path: Path) -> StateView:
        """The view of checkpoint directory `path` (which must be one of this index's)."""
        path = Path(path)
        for step, p in self.paths.items():
            if p.resolve() == path.resolve():
                return self.view(step)
        raise CheckpointCorrupt(f"{path}: not a committed checkpoint of {self.root}")

    def needed_steps(self, keep: list[int]) -> set[int]:
        """The checkpoints that the views of `keep` read from (retention must not delete any of them). A
        checkpoint whose references cannot be read needs only itself."""
        needed = set(keep)
        for step in keep:
            try:
                needed |= self.view(step).steps()
            except CheckpointCorrupt:
                continue
        return needed
