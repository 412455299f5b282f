"""Thin wrappers over torch.distributed.checkpoint that work the same with or without a process group.

A single process (tests, export, a 1-GPU run) uses DCP without collectives; DCP then warns on every call (also
from an async save's background thread) that it assumes a single process, which is exactly the intent here, so
that one warning is silenced for the process. Writes use several I/O threads per rank (one file each), so files
are written, and later hashed, in parallel.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def io_threads() -> int:
    """Writer threads per rank: the host's cores shared by the ranks on it, at most 8."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local_ranks))


def _writer(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(path), thread_count=io_threads(), sync_files=True)


def save(content: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(content, storage_writer=_writer(path), no_dist=not distributed())


def make_stager() -> Any:
    """A stager kept across saves: its host buffers (pinned, on GPU) are allocated once, and on GPU the
    device-to-host copy runs on a side stream in the background (the caller waits before the next update).

    Some torch releases (2.11 on the GPU image) close the inner copier (`StateDictStager`) at the end of every
    staging, and may close the stager itself after a save; closing empties the copier's dispatch table, and the
    next staging of a state holding a class object fails inside the copy (`KeyError: <class 'type'>`). So both
    closes are ignored here, and the owner calls `release()` once, at the end.
    """
    import torch
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    class RunStager(DefaultStager):
        def __init__(self, options: StagingOptions):
            super().__init__(options)
            copier = self._state_dict_stager
            self._close_copier = copier.close
            copier.close = lambda: None

        def close(self) -> None:
            """Ignored: the stager outlives each save (see make_stager)."""

        def release(self) -> None:
            """Free the cached (pinned) buffers and the staging thread; the stager is unusable afterwards."""
            super().close()
            self._close_copier()

    gpu = torch.cuda.is_available()
    return RunStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False, use_async_staging=gpu,
                                    use_non_blocking_copy=gpu))


def async_save(content: dict[str, Any], path: Path, process_group: Any = None, stager: Any = None) -> Any:
    """Start a background save. Returns DCP's response: a Future for the files, or (with a background stager)
    an object with `.staging_completion` (host copy done: the tensors may change) and `.upload_completion`."""
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(content, storage_writer=_writer(path), process_group=process_group,
                          async_stager=stager, no_dist=not distributed())


def load(content: dict[str, Any], path: Path) -> None:
    """Fill the tensors of `content` in place from `path`, resharding to their layout."""
    import torch.distributed.checkpoint as dcp

    dcp.load(content, checkpoint_id=path, no_dist=not distributed())
