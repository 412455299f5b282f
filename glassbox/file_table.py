"""Tables of files with their sha256 and size: what both manifests (a checkpoint's, a release's) are built on.

A table maps a file's path relative to its root (POSIX separators) to {"sha256", size}; the size's key is
"bytes" in checkpoints and "size" in releases (their published format). Building one reads
every file once, several at a time (hashlib releases the GIL on large buffers, so threads hash at disk speed);
checking one names every file that is missing, changed, or present but unlisted.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from glassbox.errors import GlassboxError

READ_BLOCK = 1 << 20


def list_files(root: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under `root` as sorted relative POSIX paths; a symlink is an error naming it (a table
    of hashes must describe bytes that are really there)."""
    root = Path(root)
    skip = set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in skip:
                continue
            if path.is_symlink():
                raise GlassboxError(f"{path}: a symlink; copy the file instead")
            out.append(rel)
    return sorted(out)


def hash_file(path: Path, ranges: list[tuple[int, int]] = ()) -> tuple[str, list[str]]:
    """sha256 of the whole file and of each byte range (offset, length) in it, in one sequential read.

    Ranges must not overlap; they are hashed as the read passes them, so a file is read once however many
    tensors it holds (a checkpoint hashes every tensor this way while it hashes its files).
    """
    whole = hashlib.sha256()
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    parts = [hashlib.sha256() for _ in ranges]
    pos = 0
    k = 0
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            whole.update(block)
            end = pos + len(block)
            while k < len(order):
                offset, length = ranges[order[k]]
                lo, hi = max(offset, pos), min(offset + length, end)
                if lo < hi:
                    parts[order[k]].update(block[lo - pos:hi - pos])
                if offset + length <= end:
                    k += 1
                else:
                    break
            pos = end
    return whole.hexdigest(), [p.hexdigest() for p in parts]


def parallel_map(fn: Callable, items: list) -> list:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(items)))) as pool:
        return list(pool.map(fn, items))


def file_table(root: Path, rels: list[str], size_key: str = "bytes") -> dict[str, dict[str, int | str]]:
    root = Path(root)
    digests = parallel_map(lambda rel: hash_file(root / rel)[0], rels)
    return {rel: {"sha256": d, size_key: (root / rel).stat().st_size} for rel, d in zip(rels, digests)}


@dataclass
class TableCheck:
    changed: list[str] = field(default_factory=list)   # present but of another size or hash
    missing: list[str] = field(default_factory=list)   # listed but absent
    extra: list[str] = field(default_factory=list)     # present but not listed
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def problems(self) -> list[str]:
        return ([f"hash mismatch: {p}" for p in self.changed] + [f"missing file: {p}" for p in self.missing]
                + [f"unlisted file: {p}" for p in self.extra])


def check_table(root: Path, table: dict[str, dict], present: Iterable[str] | None = None,
                size_key: str = "bytes") -> TableCheck:
    """Compare the files under `root` with `table` (sizes first, then hashes). `present`: the files that are
    there, to report unlisted ones (None: unlisted files are not looked for)."""
    root = Path(root)
    result = TableCheck()
    there = [rel for rel in sorted(table) if (root / rel).is_file()]
    result.missing = [rel for rel in sorted(table) if not (root / rel).is_file()]
    sized = [rel for rel in there if (root / rel).stat().st_size == table[rel].get(size_key)]
    result.changed = [rel for rel in there if rel not in set(sized)]
    digests = parallel_map(lambda rel: hash_file(root / rel)[0], sized)
    result.changed += [rel for rel, d in zip(sized, digests) if d != table[rel].get("sha256")]
    result.changed.sort()
    result.checked = len(there)
    if present is not None:
        result.extra = sorted(set(present) - set(table))
    return result
