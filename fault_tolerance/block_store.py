"""The block store: one run's prioritized partial checkpoints, a zarr v3 hierarchy with one array per block version.

Why zarr: the state is written a few blocks at a time, by every rank at once, and read back a few blocks at a time
(only the lost rank's); zarr is a chunked-array format that addresses exactly such pieces, records shape, dtype
and attributes (the block's step and checksum) with them, and stays readable by any zarr reader (numpy, xarray)
for analysis of what a run saved. glassbox already depends on it for the data-order log.

Why one array per block version, not one array per parameter: a zarr chunk grid is regular, and FSDP2 shard
boundaries (ceil(n / W) rows) need not fall on it, so two ranks' blocks could share a chunk and race in its
read-modify-write. A block of its own is a directory only its rank writes, so ranks write concurrently without
coordination, and a version is written under a temporary name, fsynced, and renamed into place: a crash mid-write
leaves the previous version readable (the newest committed one is read; older ones are removed after a commit,
except versions a recovery used: `pin` keeps them, so `reproduce` can read them again).

Layout: ROOT/zarr.json (a group recording the block layout), ROOT/<parameter>/<start>-<stop>/ (a group per block),
and in it step_<step> (an uncompressed float32 array [3, rows, ...]: parameter rows, exp_avg, exp_avg_sq; its
attributes hold the step and the sha256 of those bytes, checked on every read).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from glassbox.atomic import fsync_dir, fsync_tree, write_json
from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.blocks import STATE_KEYS, BlockId, BlockLayout, BlockUnavailable, SavedBlock

FORMAT = "glassbox-scar-blocks/1"
_VERSION = "step_"
PINS = "pinned.json"
_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def block_digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data, dtype=np.float32).tobytes()).hexdigest()


class BlockStore:
    """Write and read block versions under `root` for `layout` (see the module docstring)."""

    def __init__(self, root: Path, layout: BlockLayout, name: str = "block_store"):
        self.root = Path(root)
        self.layout = layout
        self.name = name
        self.bytes_written = 0
        self._open_root()

    def _open_root(self) -> None:
        meta = self.root / "zarr.json"
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_text())["attributes"]
                recorded = BlockLayout.from_json(attrs["layout"])
            except (json.JSONDecodeError, KeyError, TypeError, GlassboxError) as e:
                raise GlassboxError(f"{meta}: not a glassbox block store ({e})") from None
            if recorded != self.layout:
                raise GlassboxError(f"{self.root}: holds blocks of another layout ({recorded!r}, this run: "
                                    f"{self.layout!r})")
            return
        # Every rank may get here at once: the content is identical and write_json renames it into place.
        write_json(meta, {**_GROUP, "attributes": {"format": FORMAT, "layout": self.layout.to_json()}})

    def block_dir(self, block: BlockId) -> Path:
        return self.root / block.name / f"{block.start}-{block.stop}"

    def _ensure_groups(self, block: BlockId) -> None:
        for path in (self.root / block.name, self.block_dir(block)):
            if not (path / "zarr.json").is_file():
                write_json(path / "zarr.json", _GROUP)

    def _versions(self, block: BlockId) -> list[tuple[int, Path]]:
        directory = self.block_dir(block)
        if not directory.is_dir():
            return []
        out = []
        for entry in os.scandir(directory):
            if entry.name.startswith(_VERSION) and entry.name[len(_VERSION):].isdigit():
                out.append((int(entry.name[len(_VERSION):]), Path(entry.path)))
        return sorted(out)

    def write(self, step: int, blocks: Mapping[BlockId, Mapping[str, torch.Tensor]]) -> None:
        """Commit each block's tensors as its version of `step`, one atomic rename per block."""
        import zarr

        for block, tensors in blocks.items():
            self.layout.rank_of(block)      # a block of another layout is refused, naming it
            shape = self.layout.block_shape(block)
            data = np.stack([tensors[k].detach().to("cpu", torch.float32).reshape(shape).numpy() for k in STATE_KEYS])
            self._ensure_groups(block)
            directory = self.block_dir(block)
            final = directory / f"{_VERSION}{step:09d}"
            tmp = directory / f".tmp-{final.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            array = zarr.create_array(store=str(tmp), shape=data.shape, chunks=data.shape, dtype="float32",
                                      compressors=None, zarr_format=3,
                                      attributes={"block": str(block), "step": step, "sha256": block_digest(data)})
            array[...] = data
            fsync_tree(tmp)
            if final.exists():      # the same step written again (a resumed run): swap the old copy out
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(directory)
            pinned = self._pinned(block)
            for old_step, old in self._versions(block):
                if old_step < step and old_step not in pinned:
                    shutil.rmtree(old, ignore_errors=True)
            self.bytes_written += data.nbytes

    def _pinned(self, block: BlockId) -> set[int]:
        path = self.block_dir(block) / PINS
        return set(json.loads(path.read_text())) if path.is_file() else set()

    def pin(self, block: BlockId, step: int) -> None:
        """Keep the version of `step` of `block` from being removed by later writes (a recovery restored it)."""
        pinned = self._pinned(block) | {step}
        write_json(self.block_dir(block) / PINS, sorted(pinned))

    def read(self, block: BlockId, step: int | None = None) -> SavedBlock:
        """The newest committed version of `block` (or the version of `step`), checked against its sha256;
        else BlockUnavailable naming the block, the file and why."""
        import zarr

        self.layout.rank_of(block)
        versions = [v for v in self._versions(block) if step is None or v[0] == step]
        if not versions:
            why = "never saved in this block store" if step is None else f"holds no version of step {step}"
            raise BlockUnavailable(block, str(self.root), why)
        step, path = versions[-1]
        try:
            array = zarr.open_array(store=str(path), mode="r")
            data = np.asarray(array[...], dtype=np.float32)
            digest = array.attrs["sha256"]
            recorded_step = int(array.attrs["step"])
        except Exception as e:      # zarr and its codecs raise many types for a damaged file
            raise BlockUnavailable(block, str(path), f"unreadable ({type(e).__name__}: {e})") from None
        shape = (len(STATE_KEYS), *self.layout.block_shape(block))
        if data.shape != shape:
            raise BlockUnavailable(block, str(path), f"holds shape {data.shape}, the block is {shape}")
        if block_digest(data) != digest:
            raise BlockUnavailable(block, str(path), "sha256 mismatch (corrupted)")
        if recorded_step != step:
            raise BlockUnavailable(block, str(path), f"records step {recorded_step} under the name of step {step}")
        return SavedBlock(step, {k: torch.from_numpy(data[i].copy()) for i, k in enumerate(STATE_KEYS)})

    def saved_steps(self) -> dict[BlockId, int]:
        """The step of the newest committed version of every block that has one."""
        out = {}
        for block in self.layout.blocks:
            versions = self._versions(block)
            if versions:
                out[block] = versions[-1][0]
        return out
