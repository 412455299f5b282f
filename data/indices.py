"""The global sample order of one epoch, built by megatron-core and cached under a hash of what determines it.

megatron-core's GPTDataset turns a token store into three index files (document order, sample boundaries,
sample shuffle) and its BlendedMegatronDatasetBuilder interleaves several stores by weight (dataset index and
dataset sample index). Those arrays ARE the data order. This module builds them for one
(stores, weights, split, seq_len, seed, epoch) and keeps them in `CACHE/<key>/`, where `<key>` hashes exactly
those inputs plus the megatron-core version.

Why the care around building:
- The builder is torch.distributed-aware: it builds on rank 0, calls a barrier, then loads on the other ranks, and
  its blended index needs a process group to exist. Outside torchrun we give it a private one-process gloo group
  for the duration of the build. Inside torchrun (a default group already exists) the build runs in a child
  process instead, so no collective call is ever made behind the trainer's back.
- Several ranks may ask for the same epoch at once: a file lock lets one build while the others wait, and the
  result is built in a staging folder renamed into place whole, so a reader never sees half an index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from glassbox.atomic import fsync_dir, fsync_tree, write_json
from glassbox.errors import GlassboxError

# megatron's blend needs a little more than the exact target from each store, in case its greedy interleave
# overshoots a weight; this is megatron's own default.
MID_LEVEL_SURPLUS = 0.005
_SPLIT_IDS = {"train": 0, "valid": 1}


@dataclass(frozen=True)
class Component:
    prefix: str                  # megatron path prefix of one store split (DATA_DIR/train)
    fingerprint: str             # the store's fingerprint: the cache key follows content, not location
    weight: float
    eod_id: int
    vocab_size: int


@dataclass(frozen=True)
class EpochSpec:
    components: tuple[Component, ...]
    split: str
    seq_len: int
    seed: int
    epoch: int
    size: int | None             # samples in a blended epoch; None for a single store (one natural epoch)

    def key(self) -> str:
        from importlib.metadata import version

        content = {
            "components": [(c.fingerprint, c.weight, Path(c.prefix).name) for c in self.components],
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "epoch": self.epoch,
            "size": self.size,
            "megatron_core": version("megatron-core"),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def random_seed(self) -> int:
        """megatron's RNG seed for this epoch: every epoch reshuffles, and (seed, epoch) pairs never collide."""
        return (self.seed * 1_000_003 + self.epoch) % 2**32

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EpochSpec":
        raw = json.loads(text)
        raw["components"] = tuple(Component(**c) for c in raw["components"])
        return cls(**raw)


class _StoreTokenizer:
    """The little of a tokenizer megatron's GPT dataset config asks for (its ids and a cache identity)."""

    def __init__(self, eod: int, vocab_size: int, fingerprints: list[str]):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "glassbox.TokenStore", "fingerprints": fingerprints}


@contextlib.contextmanager
def _private_process_group() -> Iterator[None]:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _build_with_megatron(spec: EpochSpec, out: Path) -> None:
    """Run megatron's builder for `spec` with its cache in `out`, then record which files hold which index."""
    from glassbox.data.store import megatron_datasets

    md = megatron_datasets()
    first = spec.components[0]
    weights = None if spec.size is None else [c.weight for c in spec.components]
    blend = ([c.prefix for c in spec.components], weights)
    split_id = _SPLIT_IDS[spec.split]
    blend_per_split = [None, None, None]
    blend_per_split[split_id] = blend
    sizes = [None, None, None]
    sizes[split_id] = spec.size
    config = md.gpt_dataset.GPTDatasetConfig(
        random_seed=spec.random_seed,
        sequence_length=spec.seq_len,
        blend_per_split=blend_per_split,
        path_to_cache=str(out),
        tokenizer=_StoreTokenizer(first.eod_id, first.vocab_size, [c.fingerprint for c in spec.components]),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=MID_LEVEL_SURPLUS,
    )
    builder = md.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder(
        md.gpt_dataset.GPTDataset, sizes, lambda: True, config
    )
    dataset = builder.build()[split_id]
    gpt_datasets = dataset.datasets if spec.size is not None else [dataset]
    layout = {
        "num_samples": len(dataset),
        "gpt": [
            {
                affix: f"{d.unique_description_hash}-GPTDataset-{d.index_split.name}-{affix}_index.npy"
                for affix in ("document", "sample", "shuffle")
            }
            for d in gpt_datasets
        ],
    }
    if spec.size is not None:
        stem = f"{dataset.unique_description_hash}-BlendedDataset-{dataset.split.name}"
        layout["blend"] = {"dataset": f"{stem}-dataset_index.npy", "dataset_sample": f"{stem}-dataset_sample_index.npy"}
    for names in layout["gpt"] + [layout.get("blend", {})]:
        for name in names.values():
            if not (out / name).is_file():
                raise GlassboxError(f"megatron-core did not write the expected index file {name} in {out}")
    write_json(out / "layout.json", layout)


def _build(spec: EpochSpec, out: Path) -> None:
    from glassbox.distributed import is_distributed

    if is_distributed():
        proc = subprocess.run(
            [sys.executable, "-m", "glassbox.data.indices", spec.to_json(), str(out)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GlassboxError(f"building the sample index in {out} failed: {tail[0]}")
    else:
        with _private_process_group():
            _build_with_megatron(spec, out)


def ensure_epoch_index(spec: EpochSpec, cache_dir: Path) -> Path:
    """The cache folder holding `spec`'s index files, building it first if absent (one builder at a time)."""
    final = Path(cache_dir) / spec.key()
    if (final / "layout.json").is_file():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / f"{final.name}.lock", "w")
    except OSError as e:
        raise GlassboxError(f"sample index cache {cache_dir}: cannot write ({e.strerror}); pass another cache_dir")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "layout.json").is_file():
            return final
        staging = cache_dir / f"{final.name}.tmp.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _build(spec, staging)
            fsync_tree(staging)
            os.replace(staging, final)
            fsync_dir(cache_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


@dataclass
class EpochIndex:
    """One epoch's order, memory-mapped: per component (document, sample, shuffle), and for a blend, which
    component and which of its samples each position takes."""

    num_samples: int
    gpt: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    blend: tuple[np.ndarray, np.ndarray] | None


def load_epoch_index(folder: Path) -> EpochIndex:
    layout = json.loads((folder / "layout.json").read_text())

    def load(name: str) -> np.ndarray:
        return np.load(folder / name, mmap_mode="r", allow_pickle=False)

    gpt = [(load(g["document"]), load(g["sample"]), load(g["shuffle"])) for g in layout["gpt"]]
    blend = None
    if "blend" in layout:
        blend = (load(layout["blend"]["dataset"]), load(layout["blend"]["dataset_sample"]))
    return EpochIndex(int(layout["num_samples"]), gpt, blend)


if __name__ == "__main__":
    # The child-process build used inside torchrun (see the module docstring).
    with _private_process_group():
        _build_with_megatron(EpochSpec.from_json(sys.argv[1]), Path(sys.argv[2]))
