"""One self-contained checkpoint directory from a view whose tensors live in several checkpoints.

A release branch (and anyone who copies a checkpoint elsewhere) needs a directory that holds its whole state.
`consolidate` writes one: the head checkpoint's files as they are, plus, for every tensor taken from another
checkpoint, its stored chunks copied byte for byte into one more DCP file per source, and DCP's metadata
rewritten to find them there. No tensor is decoded or re-encoded, so the copy is exact and costs one read of
the bytes it needs. The new manifest keeps each tensor's own step. A view with one source is copied as is.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

from glassbox.atomic import staged_dir
from glassbox.checkpoints.index import StateView
from glassbox.checkpoints.dcp_io import read_metadata
from glassbox.checkpoints.layout import DCP_DIR
from glassbox.checkpoints.manifest import (
    MANIFEST,
    MODEL_PREFIX,
    OPTIM_STATE_PREFIX,
    SELF_HASH,
    read_manifest,
    write_manifest,
)

METADATA = ".metadata"


def _owns(key: str, names: set[str]) -> bool:
    """Whether DCP entry `key` is one of the parameters `names` (its weight or an optimizer moment)."""
    if key.startswith(MODEL_PREFIX):
        return key[len(MODEL_PREFIX):] in names
    if key.startswith(OPTIM_STATE_PREFIX):
        return key[len(OPTIM_STATE_PREFIX):].rsplit(".", 1)[0] in names
    return False


def _copy_entries(source: Path, names: set[str], out_file: Path, metadata) -> None:
    """Append the chunks of `names` stored in `source`'s DCP files to `out_file`, registering them in `metadata`."""
    from dataclasses import replace

    src = read_metadata(source / DCP_DIR)
    with open(out_file, "wb") as out:
        for index, info in sorted(src.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
            if not _owns(index.fqn, names):
                continue
            with open(source / DCP_DIR / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            metadata.storage_data[index] = replace(info, relative_path=out_file.name, offset=out.tell())
            out.write(data)
            metadata.state_dict_metadata[index.fqn] = src.state_dict_metadata[index.fqn]
            if src.planner_data and index.fqn in src.planner_data:
                metadata.planner_data[index.fqn] = src.planner_data[index.fqn]


def consolidate(view: StateView, dest: Path) -> Path:
    """Write `view` as one checkpoint directory at `dest` (atomically); returns `dest`."""
    dest = Path(dest)
    sources = view.sources()
    if len(sources) == 1:
        shutil.copytree(view.path, dest, copy_function=shutil.copyfile)
        return dest
    with staged_dir(dest) as tmp:
        shutil.copytree(view.path, tmp, dirs_exist_ok=True, copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns(MANIFEST))
        metadata = read_metadata(view.path / DCP_DIR)
        for source, names in sources.items():
            if source != view.path:
                _copy_entries(source, set(names), tmp / DCP_DIR / f"__from_{source.name}.distcp", metadata)
        with open(tmp / DCP_DIR / METADATA, "wb") as f:
            pickle.dump(metadata, f)
        head = read_manifest(view.path)
        info = {k: v for k, v in head.items() if k not in ("format", "tensors", "objects", "files", SELF_HASH)}
        write_manifest(tmp, info, steps={name: src.step for name, src in view.tensors.items()})
    return dest
