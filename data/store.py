"""A prepared DATA_DIR, read back: tokenizer, meta.json and megatron-core IndexedDataset files per split.

Layout (written by `glassbox data prepare`):
  tokenizer.json           the tokenizer (loads in transformers)
  meta.json                sources, counts, settings, file hashes, per-16-MiB-chunk hashes of the token files, and
                           the fingerprint over all of them
  train.bin / train.idx    megatron-core IndexedDataset of the training documents, one sequence per document
  valid.bin / valid.idx    the same for the held-out documents
  cache/                   sampler index files (megatron GPTDataset/BlendedDataset indices); not fingerprinted
"""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from glassbox.atomic import sha256_file
from glassbox.errors import GlassboxError

SPLITS = ("train", "valid")
META_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype megatron's indexed dataset reads back for token ids below `vocab_size`: uint16, else
    int32 (its index format has no uint32 code), so a store and the arrays released from it agree."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def megatron_datasets() -> SimpleNamespace:
    """megatron-core's dataset modules, imported quietly: importing megatron.core warns about optional GPU
    libraries (Transformer Engine, Apex) that the data pipeline never uses.

    The index builders need megatron's C++ `helpers_cpp` extension. Its wheels (Python 3.11 and 3.12, x86_64)
    ship it compiled, so nothing is compiled at run time; an install without it fails here, saying so."""
    names = ("indexed_dataset", "gpt_dataset", "blended_megatron_dataset_builder", "utils", "helpers")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SimpleNamespace(**{n: importlib.import_module(f"megatron.core.datasets.{n}") for n in names})
    except ImportError as e:
        raise GlassboxError(
            f"megatron-core's dataset modules cannot be imported ({e}); install the megatron-core==0.16.1 wheel, "
            f"which ships the compiled helpers_cpp extension"
        ) from None


CHUNK_BYTES = 1 << 24     # the token files are hashed per 16 MiB chunk at prepare, and checked per chunk as read


def canonical_sha256(obj) -> str:
    """sha256 of `obj` as sorted, compact JSON: equal content, equal hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ChunkCheck:
    """Checks the bytes of one token file against its per-chunk sha256 from prepare, each chunk the first time
    a read touches it: a modified store fails at the first sample read from a changed chunk, at the cost of
    hashing each chunk once per process, however large the store."""

    def __init__(self, path: Path, chunk_bytes: int, hashes: list[str]):
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.hashes = hashes
        self._verified: set[int] = set()
        self._lock = threading.Lock()

    def check(self, lo: int, hi: int) -> None:
        """Bytes [lo, hi) are about to be used."""
        for k in range(lo // self.chunk_bytes, (max(hi, lo + 1) - 1) // self.chunk_bytes + 1):
            if k in self._verified:
                continue
            with open(self.path, "rb") as f:
                f.seek(k * self.chunk_bytes)
                data = f.read(self.chunk_bytes)
            if k >= len(self.hashes) or hashlib.sha256(data).hexdigest() != self.hashes[k]:
                raise GlassboxError(
                    f"data dir {self.path.parent}: {self.path.name} bytes {k * self.chunk_bytes}..."
                    f"{k * self.chunk_bytes + len(data)} (chunk {k}) do not match their sha256 from prepare: the "
                    "store was modified, so the data changed since training on it (prepare it again; "
                    "`data.verify=false` reads it anyway, recorded in the run manifest)")
            with self._lock:
                self._verified.add(k)


class TokenStore:
    """Read-only view of a prepared DATA_DIR; opening it checks that meta.json and every listed file exist, and
    that meta.json is what prepare wrote (its fingerprint is the hash of the rest of it)."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise GlassboxError(f"data dir {self.path}: no such directory (run `glassbox data prepare`)")
        if not meta_path.is_file():
            raise GlassboxError(f"data dir {self.path}: no meta.json (not a prepared data dir)")
        try:
            self.meta: dict = json.loads(meta_path.read_text())
        except ValueError as e:
            raise GlassboxError(f"{meta_path}: corrupt JSON ({e})") from None
        for key in ("fingerprint", "vocab_size", "eod_id", "files", "splits", "dtype"):
            if key not in self.meta:
                raise GlassboxError(f"{meta_path}: missing key {key!r}")
        if self.meta.get("format") != META_FORMAT:
            raise GlassboxError(f"{meta_path}: format {self.meta.get('format')!r}, expected {META_FORMAT}")
        for name in self.meta["files"]:
            if not (self.path / name).is_file():
                raise GlassboxError(f"data dir {self.path}: {name} listed in meta.json is missing")
        if canonical_sha256({k: v for k, v in self.meta.items() if k != "fingerprint"}) != self.meta["fingerprint"]:
            raise GlassboxError(f"{meta_path}: its content does not match its fingerprint (meta.json was edited)")
        self.verify_file("tokenizer.json")      # small, and copied into every checkpoint: checked whole

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eod_id(self) -> int:
        return int(self.meta["eod_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def prefix(self, split: str) -> Path:
        """The megatron path prefix (`.bin`/`.idx` without extension) of a split."""
        if split not in SPLITS:
            raise GlassboxError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return self.path / split

    def split_tokens(self, split: str) -> int:
        self.prefix(split)
        return int(self.meta["splits"][split]["tokens"])

    def tokenizer(self):
        from glassbox.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def tokens_check(self, split: str) -> ChunkCheck:
        """The checker of `split`'s token file (its index file, small, is checked whole here)."""
        self.verify_file(f"{split}.idx")
        name = f"{split}.bin"
        chunks = self.meta.get("chunks", {}).get(name)
        if chunks is None:      # a store prepared before per-chunk hashes: the whole file is its one chunk
            size = (self.path / name).stat().st_size
            return ChunkCheck(self.path / name, max(1, size), [self.meta["files"][name]])
        return ChunkCheck(self.path / name, int(self.meta["chunk_bytes"]), chunks)

    def verify_file(self, name: str) -> None:
        if sha256_file(self.path / name) != self.meta["files"][name]:
            raise GlassboxError(f"data dir {self.path}: {name} does not match its sha256 in meta.json (modified)")

    def verify(self) -> None:
        """Re-hash every file against meta.json; a mismatch means the store was modified after prepare."""
        for name in sorted(self.meta["files"]):
            self.verify_file(name)

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, fingerprint={self.fingerprint[:12]})"
