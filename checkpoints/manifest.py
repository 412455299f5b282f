"""MANIFEST.json: what a checkpoint holds, with the sha256 of every file and of every tensor in it.

A checkpoint may hold any subset of the training state's tensors (ARCHITECTURE.md, invariant 3). Its manifest
has, for every parameter of the state, the step its values are from: parameters this directory holds carry
that step, their shape and dtype, and the byte ranges (file, offset, length, sha256) of the weight and of each
optimizer moment in the DCP files; parameters it does not hold carry the step of the checkpoint that does and
that copy's sha256, so `CheckpointIndex` can resolve and check them. Non-tensor DCP entries (the optimizer's
param groups) are hashed the same way under `objects`. Hashes are computed in the same single read that hashes
the files, so per-tensor hashes cost no extra I/O.

A directory counts only if its manifest verifies: every listed file present, of the listed size and hash. A
truncated or corrupted file is refused with a message that names it (and, for a tensor, which tensor). The
manifest checks itself too: `manifest_sha256` is the hash of the rest of its content, so an edited field (the
step, the model config a checkpoint exports with) is refused like a corrupted file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from glassbox.atomic import write_json
from glassbox.checkpoints.dcp_io import read_metadata
from glassbox.checkpoints.layout import DCP_DIR
from glassbox.errors import GlassboxError
from glassbox.file_table import check_table, hash_file, list_files, parallel_map

MANIFEST = "MANIFEST.json"
FORMAT = "glassbox-checkpoint/2"
SELF_HASH = "manifest_sha256"
MODEL_PREFIX = "model."
OPTIM_STATE_PREFIX = "optim.state."


class CheckpointCorrupt(GlassboxError):
    """A checkpoint whose manifest is missing or does not match its files; the message names the file."""


def _dcp_layout(dcp_dir: Path) -> tuple[dict[str, list[tuple[str, int, int]]], dict[str, tuple[list[int], str]]]:
    """From DCP's metadata (read once): every entry's stored chunks as (file relative to the checkpoint, offset,
    length), in chunk order, and every tensor entry's (shape, dtype)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(dcp_dir)
    chunks: dict[str, list[tuple[tuple, str, int, int]]] = {}
    for index, info in metadata.storage_data.items():
        order = (tuple(index.offset) if index.offset is not None else (), index.index or 0)
        chunks.setdefault(index.fqn, []).append((order, f"{DCP_DIR}/{info.relative_path}", info.offset, info.length))
    tensors = {key: (list(meta.size), str(meta.properties.dtype))
               for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    return {key: [c[1:] for c in sorted(parts)] for key, parts in chunks.items()}, tensors


def entry_digest(chunks: list[list]) -> str:
    """One sha256 for an entry stored in several chunks: the hash of its chunks' hashes, in chunk order."""
    return hashlib.sha256("".join(c[3] for c in chunks).encode()).hexdigest()


def _split_key(key: str) -> tuple[str, str] | None:
    """DCP key -> (parameter name, "weight" or the optimizer moment), or None for a non-tensor entry."""
    if key.startswith(MODEL_PREFIX):
        return key[len(MODEL_PREFIX):], "weight"
    if key.startswith(OPTIM_STATE_PREFIX):
        name, moment = key[len(OPTIM_STATE_PREFIX):].rsplit(".", 1)
        return name, moment
    return None


def write_manifest(root: Path, info: dict[str, Any], references: dict[str, dict[str, Any]] | None = None,
                   steps: dict[str, int] | None = None) -> dict[str, Any]:
    """Hash every file under `root` (and every DCP entry within them) and write MANIFEST.json atomically.

    The tensors held here are from step `info["step"]`, or from `steps[name]` (a consolidated copy of tensors
    of several steps); `references` gives, for parameters of the state held elsewhere, {"step", "sha256"} of
    the copy they come from.
    """
    root = Path(root)
    rels = list_files(root, exclude=[MANIFEST])
    chunks, meta = _dcp_layout(root / DCP_DIR) if (root / DCP_DIR / ".metadata").is_file() else ({}, {})
    ranges: dict[str, list[tuple[str, int, int]]] = {}
    for key, parts in chunks.items():
        for i, (rel, offset, length) in enumerate(parts):
            ranges.setdefault(rel, []).append((key, i, offset, length))
    hashed = parallel_map(lambda rel: hash_file(root / rel, [(o, n) for _, _, o, n in ranges.get(rel, [])]), rels)
    files, hashed_chunks = {}, {key: [None] * len(parts) for key, parts in chunks.items()}
    for rel, (digest, part_digests) in zip(rels, hashed):
        files[rel] = {"sha256": digest, "bytes": (root / rel).stat().st_size}
        for (key, i, offset, length), part in zip(ranges.get(rel, []), part_digests):
            hashed_chunks[key][i] = [rel, offset, length, part]
    tensors: dict[str, dict[str, Any]] = {name: dict(ref) for name, ref in (references or {}).items()}
    objects: dict[str, dict[str, Any]] = {}
    for key, parts in sorted(hashed_chunks.items()):
        entry = {"sha256": entry_digest(parts), "chunks": parts}
        split = _split_key(key) if key in meta else None
        if split is None:
            objects[key] = entry
            continue
        name, part = split
        held = tensors.setdefault(name, {})
        held["step"] = (steps or {}).get(name, info["step"])
        if part == "weight":
            shape, dtype = meta[key]
            held.update(shape=shape, dtype=dtype, **entry)
        else:
            held.setdefault("optimizer", {})[part] = entry
    manifest = {"format": FORMAT, **info, "tensors": tensors, "objects": objects, "files": files}
    manifest[SELF_HASH] = content_sha256(manifest)
    write_json(root / MANIFEST, manifest)
    return manifest


def content_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's content without its own hash, as sorted compact JSON."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CheckpointCorrupt(f"{path}: missing (not a complete checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointCorrupt(f"{path}: not a {FORMAT} manifest")
    if manifest.get(SELF_HASH) != content_sha256(manifest):
        raise CheckpointCorrupt(f"{path}: its content does not match its manifest_sha256 (the manifest was edited)")
    return manifest


def verify(root: Path) -> dict[str, Any]:
    """The manifest of `root` if every file it lists is intact; else CheckpointCorrupt naming the bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    check = check_table(root, manifest["files"])
    for rel in check.missing:
        raise CheckpointCorrupt(f"{root / rel}: missing")
    for rel in check.changed:
        size = (root / rel).stat().st_size
        expected = manifest["files"][rel]["bytes"]
        if size != expected:
            raise CheckpointCorrupt(f"{root / rel}: {size} bytes, manifest says {expected} (truncated or altered)")
        raise CheckpointCorrupt(f"{root / rel}: sha256 mismatch (corrupted)")
    return manifest


def checked_manifest(root: Path, verify_hashes: bool = True) -> dict[str, Any]:
    """`verify(root)`, or with `verify_hashes` off (the caller verified already) only `read_manifest(root)`."""
    return verify(root) if verify_hashes else read_manifest(root)


def held_entries(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A held parameter's stored entries: "weight" and each optimizer moment, each with its chunks."""
    out = {"weight": entry} if "chunks" in entry else {}
    out.update(entry.get("optimizer", {}))
    return out


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def verify_entries(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Check the stored bytes of the named entries (a parameter's weight / moments, or an object) against their
    chunk hashes, reading only those bytes; CheckpointCorrupt names the entry, the file and the directory."""
    root = Path(root)
    jobs = [(name, chunk) for name, entry in entries.items() for chunk in entry["chunks"]]

    def check(job: tuple[str, list]) -> str | None:
        name, (rel, offset, length, digest) = job
        path = root / rel
        if not path.is_file():
            return f"{root}: tensor {name}: {rel} is missing"
        data = _read_range(path, offset, length)
        if len(data) != length:
            return f"{root}: tensor {name}: {rel} is truncated ({len(data)} of {length} bytes at {offset})"
        if hashlib.sha256(data).hexdigest() != digest:
            return f"{root}: tensor {name}: sha256 mismatch in {rel} (corrupted)"
        return None

    for problem in parallel_map(check, jobs):
        if problem is not None:
            raise CheckpointCorrupt(problem)
