"""A persistent compile cache for the engine, so that a second start of the same model at the same sizes is quick.

`torch.compile` keeps inductor's compiled graphs in a per-machine temp folder that a new container or a cleaned
/tmp loses; the portable artifacts of `torch.compiler.save_cache_artifacts` are those graphs as one blob that a
later process loads with `load_cache_artifacts` before compiling, so compiling then hits instead of building.
This module files that blob under a key naming everything that decides what gets compiled: the model's
configuration, dtype, device and card, the engine sizes (KV blocks, batch sizes, context, graph options) and the
torch / CUDA / Python / glassbox versions. A different key is a different entry, never a wrong one.

A cache entry is a folder `<root>/<key>/` with `artifacts.bin` and `meta.json` (the key's fields and the blob's
sha256), written together by an atomic rename. An entry that does not load (missing half, a hash that does not
match, a blob torch refuses, fields that are not this key's) is ignored with a warning and replaced on the next
save: a bad cache costs one cold start, never a failed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from glassbox import __version__, atomic

log = logging.getLogger(__name__)

ENV_DIR = "GLASSBOX_COMPILE_CACHE"


def default_root() -> Path:
    """$GLASSBOX_COMPILE_CACHE, else $XDG_CACHE_HOME/glassbox/compile, else ~/.cache/glassbox/compile."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "glassbox" / "compile"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor()}".strip()


def key_fields(model_config: dict[str, Any], model_class: str, dtype: torch.dtype, device: torch.device,
               sizes: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides what the engine compiles, as JSON-able fields (the key is their hash)."""
    return {
        "model_class": model_class, "model_config": model_config, "dtype": str(dtype), "device": device.type,
        "device_name": device_name(device), "sizes": sizes, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": sys.version.split()[0], "glassbox": __version__,
    }


def _canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, default=str)


class CompileCache:
    """One entry of the cache: `load` before compiling, `save` after."""

    def __init__(self, root: Path, fields: dict[str, Any]):
        self.fields = json.loads(_canonical(fields))
        self.key = hashlib.sha256(_canonical(fields).encode()).hexdigest()[:32]
        self.path = Path(root) / self.key
        self.state = "miss"          # "hit" after a load that took, "ignored" after one that did not

    def _ignore(self, why: str) -> bool:
        log.warning("compile cache %s ignored (%s): compiling from scratch, the entry is replaced afterwards",
                    self.path, why)
        self.state = "ignored"
        return False

    def load(self) -> bool:
        """Load the entry's artifacts into torch's caches; False (with a warning when it exists) if it cannot."""
        meta_path, blob_path = self.path / "meta.json", self.path / "artifacts.bin"
        if not self.path.exists():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            blob = blob_path.read_bytes()
        except (OSError, ValueError) as e:
            return self._ignore(f"unreadable: {e}")
        if not isinstance(meta, dict) or meta.get("fields") != self.fields:
            return self._ignore("written for other settings than these")
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            return self._ignore("artifacts.bin does not match its recorded sha256")
        try:
            info = torch.compiler.load_cache_artifacts(blob)
        except Exception as e:          # torch raises assorted errors for a blob it cannot parse...
            return self._ignore(f"torch could not load it: {type(e).__name__}: {e}")
        if info is None:                # ...or logs the error and returns None
            return self._ignore("torch could not load it (see torch.compiler's warning above)")
        self.state = "hit"
        return True

    def save(self) -> bool:
        """Write what this process compiled (torch's artifacts so far) as the entry; False if there is nothing."""
        out = torch.compiler.save_cache_artifacts()
        if out is None:
            return False
        blob = out[0]
        meta = {"fields": self.fields, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
        try:
            with atomic.staged_dir(self.path, replace=True) as tmp:
                (tmp / "artifacts.bin").write_bytes(blob)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except OSError as e:            # a read-only or full cache disk must not fail a start that worked
            log.warning("compile cache %s not written: %s", self.path, e)
            return False
        return True


@dataclasses.dataclass
class Startup:
    """How the engine's model runner started: the cache's state ("off", "miss", "hit", "ignored"), the graphs
    inductor had to build (0 on a warm start), and the seconds it took."""

    compile_cache: str = "off"
    compiled_graphs: int = 0
    seconds: float = 0.0


def _inductor_misses() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


def engine_sizes(cfg: Any, num_blocks: int, max_model_len: int) -> dict[str, Any]:
    """The engine settings that decide which graphs get compiled, and how: the key's `sizes`."""
    return {"num_blocks": num_blocks, "block_size": cfg.block_size, "max_model_len": max_model_len,
            "max_num_seqs": cfg.max_num_seqs, "cuda_graphs": cfg.cuda_graphs,
            "num_spec_tokens": cfg.num_spec_tokens, "spec_batch_tokens": cfg.spec_batch_tokens,
            "piecewise_graphs": cfg.piecewise_graphs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "graph_compile": cfg.graph_compile, "fuse_projections": cfg.fuse_projections}


@contextlib.contextmanager
def compile_cache_for(cfg: Any, model: torch.nn.Module, num_blocks: int, max_model_len: int) -> Iterator[Startup]:
    """Around building the engine's model runner: load the cache entry for these settings first (with
    `cfg.compile` and `cfg.compile_cache`), and save it afterwards when anything had to be compiled."""
    startup, t0 = Startup(), time.perf_counter()
    cache = None
    if cfg.compile and cfg.compile_cache:
        sizes = engine_sizes(cfg, num_blocks, max_model_len)
        p = next(model.parameters())
        model_config = dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else vars(model.config)
        fields = key_fields(model_config, type(model).__name__, p.dtype, p.device, sizes)
        cache = CompileCache(Path(cfg.compile_cache_dir) if cfg.compile_cache_dir else default_root(), fields)
        cache.load()
    misses = _inductor_misses()
    yield startup
    startup.compiled_graphs = _inductor_misses() - misses
    if cache is not None:
        startup.compile_cache = cache.state
        if startup.compiled_graphs:
            cache.save()
    startup.seconds = round(time.perf_counter() - t0, 3)
