"""MANIFEST.json: what a checkpoint holds and the sha256 of every file in it (ARCHITECTURE.md, invariant 6).

A checkpoint counts only if its manifest verifies: every listed file present, of the listed size and hash. A
truncated or corrupted file is refused with a message that names it, and `--resume auto` falls back to an older
checkpoint. The manifest also carries step, samples, tokens, the data fingerprint and, per tensor, the step at
which it was saved (invariant 3: partial checkpoints will mix steps).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from glassbox.atomic import sha256_file, write_json
from glassbox.errors import GlassboxError

MANIFEST = "MANIFEST.json"
FORMAT = "glassbox-checkpoint/1"


class CheckpointCorrupt(GlassboxError):
    """A checkpoint whose manifest is missing or does not match its files; the message names the file."""


def _files(root: Path) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _hash_all(root: Path, rels: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers, so threads hash several shard files at disk speed.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(rels)))) as pool:
        return dict(zip(rels, pool.map(lambda rel: sha256_file(root / rel), rels)))


def write_manifest(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under `root` and write MANIFEST.json (atomically) with `info` and the file table."""
    root = Path(root)
    rels = _files(root)
    hashes = _hash_all(root, rels)
    files = {rel: {"sha256": hashes[rel], "bytes": (root / rel).stat().st_size} for rel in rels}
    manifest = {"format": FORMAT, **info, "files": files}
    write_json(root / MANIFEST, manifest)
    return manifest


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
    return manifest


def verify(root: Path) -> dict[str, Any]:
    """The manifest of `root` if every file it lists is intact; else CheckpointCorrupt naming the bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, entry in files.items():
        path = root / rel
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointCorrupt(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or altered)")
    hashes = _hash_all(root, sorted(files))
    for rel, digest in hashes.items():
        if digest != files[rel]["sha256"]:
            raise CheckpointCorrupt(f"{root / rel}: sha256 mismatch (corrupted)")
    return manifest


def checked_manifest(root: Path, verify_hashes: bool = True) -> dict[str, Any]:
    """`verify(root)`, or with `verify_hashes` off (the caller verified already) only `read_manifest(root)`."""
    return verify(root) if verify_hashes else read_manifest(root)
