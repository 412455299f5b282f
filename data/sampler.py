"""The sampler: a fixed global sample order consumed by a cursor counted in samples.

The order is megatron-core's (see indices.py): for a store (or a weighted blend of stores), a split, a sequence
length and a seed, epoch e is a permutation of seq_len+1-token samples; epochs follow one another, each reshuffled.
Global sample i is therefore fixed forever, whatever the world size or batch size. A step with global batch B
takes samples [cursor, cursor + B); data-parallel rank r of W takes the contiguous slice
[cursor + r*B/W, cursor + (r+1)*B/W); every rank advances the cursor by B. B may change from step to step.

Reading a batch touches only memory-mapped arrays: the epoch's index files and the store's `.bin` tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glassbox.data.config import DataConfig
from glassbox.data.indices import Component, EpochIndex, EpochSpec, ensure_epoch_index, load_epoch_index
from glassbox.data.store import SPLITS, TokenStore, megatron_datasets
from glassbox.errors import GlassboxError

# Epoch indices kept open at once: the current one and its neighbour, for batches that straddle a boundary.
_OPEN_EPOCHS = 2


@dataclass
class SampleBatch:
    tokens: torch.Tensor   # this rank's slice, LongTensor [size // dp_world, seq_len + 1]
    start: int             # the cursor before this batch: the batch is global samples [start, start + size)
    size: int              # the global batch size


class _StoreTokens:
    """One store split's tokens as a flat memory-mapped array, with each document's start offset."""

    def __init__(self, store: TokenStore, split: str, verify: bool):
        prefix = store.prefix(split)
        self.itemsize = store.dtype.itemsize
        self.check = store.tokens_check(split) if verify else None
        indexed = megatron_datasets().indexed_dataset.IndexedDataset(str(prefix), mmap=True)
        self.starts = np.asarray(indexed.index.sequence_pointers, dtype=np.int64) // store.dtype.itemsize
        self.lengths = np.asarray(indexed.index.sequence_lengths, dtype=np.int64)
        self.tokens = np.memmap(f"{prefix}.bin", dtype=store.dtype, mode="r")

    def sample(self, document_index: np.ndarray, sample_index: np.ndarray, j: int, length: int) -> np.ndarray:
        """Tokens of megatron sample j: from (doc, offset) at row j to row j+1, plus one extra token."""
        d0, o0 = int(sample_index[j][0]), int(sample_index[j][1])
        d1, o1 = int(sample_index[j + 1][0]), int(sample_index[j + 1][1])
        if d0 == d1:
            s = self.starts[document_index[d0]] + o0
            return self._read(s, s + length)
        parts = []
        for i in range(d0, d1 + 1):
            doc = document_index[i]
            begin = self.starts[doc] + (o0 if i == d0 else 0)
            end = self.starts[doc] + (o1 + 1 if i == d1 else self.lengths[doc])
            parts.append(self._read(begin, end))
        return np.concatenate(parts)[:length]

    def _read(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end), their bytes checked against the store's chunk hashes first (unless off)."""
        if self.check is not None:
            self.check.check(int(begin) * self.itemsize, int(end) * self.itemsize)
        return self.tokens[begin:end]


class GlobalSampler:
    """See the module docstring. Build with `build_sampler`."""

    def __init__(
        self, stores: list[TokenStore], weights: list[float], split: str, seq_len: int, seed: int, cache_dir: Path,
        verify: bool = True,
    ):
        self.stores = stores
        self.weights = weights
        self.split = split
        self.seq_len = seq_len
        self.seed = seed
        self.cache_dir = cache_dir
        self.cursor = 0
        self._blended = len(stores) > 1
        counts = [(s.split_tokens(split) - 1) // seq_len for s in stores]
        for store, n in zip(stores, counts):
            if n <= 0:
                raise GlassboxError(
                    f"data dir {store.path}: the {split} split has {store.split_tokens(split)} tokens, "
                    f"too few for one sample of seq_len + 1 = {seq_len + 1}"
                )
        # A single store's epoch is megatron's natural one; a blend asks for about as many samples as all its
        # stores hold together, drawn by weight (megatron rounds each store's share up).
        self._blend_size = sum(counts) if self._blended else None
        self._components = tuple(
            Component(str(s.prefix(split)), s.fingerprint, w, s.eod_id, s.vocab_size) for s, w in zip(stores, weights)
        )
        self._tokens = [_StoreTokens(s, split, verify) for s in stores]
        self._epochs: OrderedDict[int, EpochIndex] = OrderedDict()
        self.epoch_size = self._epoch_index(0).num_samples

    @property
    def fingerprint(self) -> str:
        """The data's identity: the store's fingerprint, or a hash of the blend's fingerprints and weights."""
        if not self._blended:
            return self.stores[0].fingerprint
        blend = [[s.fingerprint, w] for s, w in zip(self.stores, self.weights)]
        return hashlib.sha256(json.dumps(blend).encode()).hexdigest()

    @property
    def epoch(self) -> int:
        return self.cursor // self.epoch_size

    def _epoch_index(self, epoch: int) -> EpochIndex:
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        spec = EpochSpec(
            components=self._components,
            split=self.split,
            seq_len=self.seq_len,
            seed=self.seed,
            epoch=epoch,
            size=self._blend_size,
        )
        index = load_epoch_index(ensure_epoch_index(spec, self.cache_dir))
        if self._epochs and index.num_samples != self.epoch_size:
            raise GlassboxError(
                f"sample index for epoch {epoch} has {index.num_samples} samples, expected {self.epoch_size} "
                f"(stale cache in {self.cache_dir}?)"
            )
        self._epochs[epoch] = index
        while len(self._epochs) > _OPEN_EPOCHS:
            self._epochs.popitem(last=False)
        return index

    def _sample(self, i: int) -> np.ndarray:
        epoch, pos = divmod(i, self.epoch_size)
        index = self._epoch_index(epoch)
        comp = 0
        if index.blend is not None:
            comp, pos = int(index.blend[0][pos]), int(index.blend[1][pos])
        document_index, sample_index, shuffle_index = index.gpt[comp]
        # A blend's per-store dataset may span several of that store's epochs; megatron sized it for us.
        return self._tokens[comp].sample(document_index, sample_index, int(shuffle_index[pos]), self.seq_len + 1)

    def samples(self, start: int, count: int) -> torch.LongTensor:
        """Global samples [start, start + count) as a LongTensor [count, seq_len + 1]; the cursor is unchanged."""
        if start < 0 or count < 0:
            raise GlassboxError(f"samples({start}, {count}): start and count must be non-negative")
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for row in range(count):
            out[row] = self._sample(start + row)
        return torch.from_numpy(out)

    def next_batch(self, global_batch_size: int, dp_rank: int = 0, dp_world: int = 1) -> SampleBatch:
        """This rank's contiguous slice of the next global batch; the cursor advances by the whole batch."""
        if global_batch_size <= 0:
            raise GlassboxError(f"global batch size must be positive, got {global_batch_size}")
        if dp_world <= 0 or not 0 <= dp_rank < dp_world:
            raise GlassboxError(f"data-parallel rank {dp_rank} of world {dp_world} is out of range")
        if global_batch_size % dp_world:
            raise GlassboxError(
                f"global batch size {global_batch_size} is not divisible by the data-parallel world size {dp_world}"
            )
        per_rank = global_batch_size // dp_world
        start = self.cursor
        tokens = self.samples(start + dp_rank * per_rank, per_rank)
        self.cursor += global_batch_size
        return SampleBatch(tokens=tokens, start=start, size=global_batch_size)

    def state_dict(self) -> dict:
        return {
            "cursor": self.cursor,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "fingerprint": self.fingerprint,
            "stores": self._store_states(),
        }

    def _store_states(self) -> list[dict]:
        """Enough about each store to say what changed when a checkpoint's store differs from today's."""
        return [
            {
                "path": str(s.path),
                "fingerprint": s.fingerprint,
                "weight": w,
                "sources": {src["spec"]: src["sha256"] for src in s.meta["sources"]},
                "tokenizer": s.meta["tokenizer"]["sha256"],
                "settings": s.meta["settings"],
            }
            for s, w in zip(self.stores, self.weights)
        ]

    def load_state_dict(self, state: dict, allow_fingerprint_change: bool = False) -> None:
        """Resume at `state`'s cursor. The order must be the same one: a changed seed or seq_len always refuses;
        a changed store refuses unless `allow_fingerprint_change` (the cursor then indexes the new order)."""
        for key in ("cursor", "seed", "seq_len", "fingerprint"):
            if key not in state:
                raise GlassboxError(f"sampler state: missing key {key!r}")
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise GlassboxError(
                    f"sampler state: data.{key} changed from {state[key]} (checkpoint) to {getattr(self, key)} "
                    f"(config); the sample order would differ"
                )
        if state["fingerprint"] != self.fingerprint and not allow_fingerprint_change:
            raise GlassboxError(f"sampler state: {self._describe_change(state)}; refusing to resume on different data")
        self.cursor = int(state["cursor"])

    def _describe_change(self, state: dict) -> str:
        old = state.get("stores")
        fallback = f"data fingerprint changed from {state['fingerprint'][:12]} to {self.fingerprint[:12]}"
        if not old:
            return fallback
        now = self._store_states()
        if len(old) != len(now):
            return f"the blend changed from {len(old)} to {len(now)} data dirs; {fallback}"
        changes = []
        for i, (a, b) in enumerate(zip(old, now)):
            if a["weight"] != b["weight"]:
                changes.append(f"blend[{i}].weight {a['weight']} -> {b['weight']}")
            if a["fingerprint"] == b["fingerprint"]:
                continue
            where = b["path"] if a["path"] == b["path"] else f"{b['path']} (was {a['path']})"
            what = [f"source {k!r} {'added' if k not in a.get('sources', {}) else 'changed'}"
                    for k, v in b.get("sources", {}).items() if a.get("sources", {}).get(k) != v]
            what += [f"source {k!r} removed" for k in a.get("sources", {}) if k not in b.get("sources", {})]
            what += [f"settings.{k} {a['settings'].get(k)} -> {v}" for k, v in b.get("settings", {}).items()
                     if "settings" in a and a["settings"].get(k) != v]
            if a.get("tokenizer") != b.get("tokenizer"):
                what.append("tokenizer changed")
            detail = ", ".join(what) or "token files differ"
            fp = f"{a['fingerprint'][:12]} -> {b['fingerprint'][:12]}"
            changes.append(f"data dir {where}: fingerprint {fp} ({detail})")
        return "; ".join(changes) or fallback


def build_sampler(cfg: DataConfig, split: str = "train", cache_dir: Path | None = None) -> GlobalSampler:
    """The sampler for `cfg` (a store or a weighted blend). Index files are cached in `cache_dir`, by default
    the `cache/` folder of the (first) store, as megatron-core does."""
    cfg.validate()
    if split not in SPLITS:
        raise GlassboxError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if cfg.blend:
        stores = [TokenStore(src.path) for src in cfg.blend]
        weights = [float(src.weight) for src in cfg.blend]
        vocab = {(s.vocab_size, s.eod_id, s.meta["tokenizer"]["sha256"]) for s in stores}
        if len(vocab) > 1:
            raise GlassboxError("data.blend: the data dirs use different tokenizers; blend stores of one tokenizer")
    else:
        stores, weights = [TokenStore(cfg.path)], [1.0]
    cache = Path(cache_dir) if cache_dir is not None else stores[0].path / "cache"
    return GlobalSampler(stores, weights, split, cfg.seq_len, cfg.seed, cache, cfg.verify)
