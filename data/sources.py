"""Corpus sources: turn a `--source` spec into an ordered list of text documents plus a content hash.

A spec is one of
  `stdlib`                 the running Python's standard-library `.py` files (sorted, tests excluded): real code
                           present on every machine, the bundled default corpus;
  `PATH` or `GLOB`         local `.txt` (a file is a document), `.jsonl` (a line's `text` field is a document)
                           or `.parquet` (a row's `text` column is a document) files;
  `hf:NAME[:SPLIT]`        a Hugging Face dataset's `text` column, loaded with `datasets` (needs the network).

Every source is read in a fixed order and hashed over its names and raw bytes, so the same inputs give the same
hash on any machine. Undecodable bytes are replaced with U+FFFD and counted rather than failing the whole run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from glassbox.errors import GlassboxError

FILE_KINDS = (".txt", ".jsonl", ".parquet")
# Folders of the standard library that hold its own test suites rather than library code.
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_BAD_BYTE = re.compile("[\udc80-\udcff]")


@dataclass
class SourceDocs:
    """What one source contributed: its documents in order and the numbers meta.json records about it."""

    spec: str
    kind: str
    documents: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    replaced_bytes: int = 0
    truncated: bool = False
    sha256: str = ""

    def summary(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "sha256": self.sha256,
            "files": self.files,
            "documents": len(self.documents),
            "bytes": self.bytes,
            "replaced_bytes": self.replaced_bytes,
            "truncated": self.truncated,
        }


class _Reader:
    """Accumulates one source's documents, hash and counts, and stops at the byte budget."""

    def __init__(self, spec: str, kind: str, max_bytes: int | None):
        self.out = SourceDocs(spec=spec, kind=kind)
        self.hash = hashlib.sha256()
        self.max_bytes = max_bytes

    @property
    def full(self) -> bool:
        return self.max_bytes is not None and self.out.bytes >= self.max_bytes

    def add(self, name: str, raw: bytes) -> None:
        """Add one document from its raw bytes; `name` (file name, line) enters the hash so reordering counts."""
        self.hash.update(name.encode("utf-8", "surrogateescape") + b"\0")
        self.hash.update(len(raw).to_bytes(8, "little") + raw)
        try:
            text, bad = raw.decode("utf-8"), 0
        except UnicodeDecodeError:
            text, bad = _BAD_BYTE.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
        self.out.replaced_bytes += bad
        self.out.bytes += len(raw)
        if text:
            self.out.documents.append(text)

    def finish(self, stopped_early: bool) -> SourceDocs:
        self.out.truncated = stopped_early
        self.out.sha256 = self.hash.hexdigest()
        if not self.out.documents:
            raise GlassboxError(f"source {self.out.spec!r}: empty corpus (no non-empty documents)")
        return self.out


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's `.py` files, sorted by relative path, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not _STDLIB_TEST_DIRS.intersection(p.relative_to(root).parts[:-1])
        and not p.name.startswith("test_")
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_stdlib(spec: str, max_bytes: int | None) -> SourceDocs:
    root, files = stdlib_files()
    reader = _Reader(spec, "stdlib", max_bytes)
    for path in files:
        if reader.full:
            return reader.finish(stopped_early=True)
        reader.add(path.relative_to(root).as_posix(), path.read_bytes())
        reader.out.files += 1
    return reader.finish(stopped_early=False)


def _expand_files(spec: str) -> tuple[Path, list[Path]]:
    """A path or glob -> (base folder names are taken relative to, sorted files). Errors name the spec."""
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise GlassboxError(f"source {spec!r}: no files match this pattern")
        # Names are relative to the folder the pattern starts in, as a folder source names its files.
        prefix = re.split(r"[*?\[]", spec, maxsplit=1)[0]
        base = Path(prefix) if prefix.endswith(("/", os.sep)) else Path(prefix).parent
        files = matches
    else:
        path = Path(spec)
        if not path.exists():
            raise GlassboxError(f"source {spec!r}: no such file or directory")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_KINDS)
            if not files:
                raise GlassboxError(f"source {spec!r}: folder holds no {', '.join(FILE_KINDS)} files")
            base = path
        else:
            files, base = [path], path.parent
    for p in files:
        if p.suffix not in FILE_KINDS:
            raise GlassboxError(
                f"source {spec!r}: unknown source kind {p.suffix or '(no extension)'!r} for {p} "
                f"(expected {', '.join(FILE_KINDS)}, stdlib or hf:NAME[:SPLIT])"
            )
    return base, files


def _to_bytes(text: str) -> bytes:
    """Text back to bytes, keeping escaped bad bytes and lone surrogates visible as invalid UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _jsonl_texts(path: Path) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                # surrogateescape keeps undecodable bytes as-is so _Reader.add can count and replace them
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError as e:
                raise GlassboxError(f"source {path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise GlassboxError(f"source {path}:{lineno}: expected an object with a string 'text' field")
            yield f"{lineno}", _to_bytes(record["text"])


def _parquet_texts(path: Path) -> Iterator[tuple[str, bytes]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise GlassboxError(f"source {path}: cannot read parquet ({type(e).__name__}: {e})") from None
    if "text" not in table.column_names:
        raise GlassboxError(f"source {path}: parquet has no 'text' column (columns: {', '.join(table.column_names)})")
    for i, text in enumerate(table.column("text").to_pylist()):
        if text is not None:
            yield f"{i}", _to_bytes(str(text))


def _read_files(spec: str, max_bytes: int | None) -> SourceDocs:
    base, files = _expand_files(spec)
    reader = _Reader(spec, "files", max_bytes)
    for path in files:
        if reader.full:
            return reader.finish(stopped_early=True)
        name = os.path.relpath(path, base)
        if path.suffix == ".txt":
            reader.add(name, path.read_bytes())
        else:
            texts = _jsonl_texts(path) if path.suffix == ".jsonl" else _parquet_texts(path)
            for row, raw in texts:
                if reader.full:
                    break
                reader.add(f"{name}:{row}", raw)
        reader.out.files += 1
    return reader.finish(stopped_early=reader.full)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so a closed network fails in seconds instead of after `datasets`' retries.
    With HF_HUB_OFFLINE set the local cache is all that is wanted, so the answer is yes."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return True
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_hf(spec: str, max_bytes: int | None) -> SourceDocs:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise GlassboxError(f"source {spec!r}: expected hf:NAME or hf:NAME:SPLIT")
    name, split = parts[1], parts[2] if len(parts) == 3 and parts[2] else "train"
    if not _hub_reachable():
        raise GlassboxError(
            f"source {spec!r}: cannot reach the Hugging Face Hub (network closed?); hf: sources need the network "
            f"or HF_HUB_OFFLINE=1 with the dataset already in the local cache"
        )
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline hubs, unknown names and bad splits surface as many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GlassboxError(
            f"source {spec!r}: cannot load Hugging Face dataset {name!r} split {split!r} "
            f"(is the network reachable?): {first}"
        ) from None
    if "text" not in ds.column_names:
        raise GlassboxError(f"source {spec!r}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    reader = _Reader(spec, "hf", max_bytes)
    for i, text in enumerate(ds["text"]):
        if reader.full:
            break
        reader.add(str(i), _to_bytes(str(text)))
    reader.out.files = 1
    return reader.finish(stopped_early=reader.full)


def read_source(spec: str, max_bytes: int | None = None) -> SourceDocs:
    """Read one source spec; `max_bytes` keeps whole documents, in order, until that many bytes are read."""
    if spec == "stdlib":
        return _read_stdlib(spec, max_bytes)
    if spec.startswith("hf:"):
        return _read_hf(spec, max_bytes)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec):
        raise GlassboxError(
            f"source {spec!r}: unknown source kind (expected a local path or glob of "
            f"{', '.join(FILE_KINDS)}, stdlib or hf:NAME[:SPLIT])"
        )
    return _read_files(spec, max_bytes)
