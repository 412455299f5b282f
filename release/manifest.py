"""The release manifest: sha256 and size of every file, so anyone can check a download byte for byte.

The manifest lists files by their path relative to the release root (POSIX separators, sorted) and holds no
timestamps, so two builds of the same run give the same manifest. It never lists itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from glassbox.atomic import sha256_file, write_json
from glassbox.errors import GlassboxError

MANIFEST_VERSION = 1


def list_files(root: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every regular file under `root` as a sorted list of relative POSIX paths (symlinks are refused)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in exclude:
                continue
            if path.is_symlink():
                raise GlassboxError(f"{path}: symlinks cannot be released; copy the file instead")
            out.append(rel)
    return sorted(out)


def build_manifest(root: Path, manifest_name: str) -> dict:
    files = {}
    for rel in list_files(root, exclude=(manifest_name,)):
        path = root / rel
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"version": MANIFEST_VERSION, "files": files}


def write_manifest(root: Path, manifest_name: str) -> dict:
    manifest = build_manifest(root, manifest_name)
    write_json(root / manifest_name, manifest)
    return manifest


@dataclass
class ManifestCheck:
    changed: list[str] = field(default_factory=list)   # present but with another hash or size
    missing: list[str] = field(default_factory=list)   # listed but absent
    extra: list[str] = field(default_factory=list)     # present but not listed
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def problems(self) -> list[str]:
        return ([f"hash mismatch: {p}" for p in self.changed] + [f"missing file: {p}" for p in self.missing]
                + [f"unlisted file: {p}" for p in self.extra])


def check_manifest(root: Path, manifest: dict, manifest_name: str) -> ManifestCheck:
    """Compare every file under `root` with the manifest; the result names each file that differs."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise GlassboxError(f"{root / manifest_name}: no 'files' table")
    present = set(list_files(root, exclude=(manifest_name,)))
    result = ManifestCheck()
    for rel in sorted(listed):
        entry = listed[rel]
        path = root / rel
        if rel not in present:
            result.missing.append(rel)
            continue
        result.checked += 1
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            result.changed.append(rel)
    result.extra = sorted(present - set(listed))
    return result
