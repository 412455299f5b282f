"""Thin wrappers over torch.distributed.checkpoint that work the same with or without a process group.

A single process (tests, export, a 1-GPU run) uses DCP without collectives; DCP then warns on every call (also
from an async save's background thread) that it assumes a single process, which is exactly the intent here, so
that one warning is silenced for the process.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def save(content: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(content, checkpoint_id=path, no_dist=not distributed())


def async_save(content: dict[str, Any], path: Path, process_group: Any = None) -> Any:
    """Start a background save; returns once tensors are staged in host memory. `.result()` waits for the files."""
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(content, checkpoint_id=path, process_group=process_group, no_dist=not distributed())


def load(content: dict[str, Any], path: Path) -> None:
    """Fill the tensors of `content` in place from `path`, resharding to their layout."""
    import torch.distributed.checkpoint as dcp

    dcp.load(content, checkpoint_id=path, no_dist=not distributed())
