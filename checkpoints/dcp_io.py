"""Thin wrappers over torch.distributed.checkpoint that work the same with or without a process group.

A single process (tests, export, a 1-GPU run) uses DCP without collectives; DCP then warns on every call (also
from an async save's background thread) that it assumes a single process, which is exactly the intent here, so
that one warning is silenced for the process. Writes use several I/O threads per rank (one file each), so files
are written, and later hashed, in parallel.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

from glassbox.distributed import is_distributed
from glassbox.errors import GlassboxError

warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")


def io_threads() -> int:
    """Writer threads per rank: the host's cores shared by the ranks on it, at most 8."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local_ranks))


def _writer(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(path), thread_count=io_threads(), sync_files=True)


def save(content: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(content, storage_writer=_writer(path), no_dist=not is_distributed())


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
                          async_stager=stager, no_dist=not is_distributed())


# What DCP's `.metadata` pickle may name: its own metadata records and the torch values inside them. Anything else
# (os.system, builtins.eval, any class whose construction runs code) is refused, as torch's weights-only loader
# refuses it in a tensor file.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class UnsafeMetadata(GlassboxError):
    """A `.metadata` file that names something other than checkpoint metadata (a crafted pickle)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeMetadata(f"refusing to unpickle {module}.{name}: not a checkpoint metadata type")


def read_metadata(dcp_dir: Path) -> Any:
    """DCP's metadata of `dcp_dir`, unpickled with only checkpoint metadata types allowed (UnsafeMetadata, a
    GlassboxError naming the file, for anything else)."""
    path = Path(dcp_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except UnsafeMetadata as e:
        raise UnsafeMetadata(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise GlassboxError(f"{path}: not readable DCP metadata ({type(e).__name__}: {e})") from None


def safe_reader(path: Path) -> Any:
    """A DCP reader of `path` whose metadata goes through `read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def load(content: dict[str, Any], path: Path) -> None:
    """Fill the tensors of `content` in place from `path`, resharding to their layout; the metadata is read
    with `read_metadata`, so loading a checkpoint never runs pickled code."""
    import torch.distributed.checkpoint as dcp

    read_metadata(path)         # refused here with its own error, before DCP wraps it in a per-rank exception
    dcp.load(content, storage_reader=safe_reader(path), no_dist=not is_distributed())
