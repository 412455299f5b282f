"""Where this process stands in a torch.distributed job, for code that must also run as a single process.

Every area (data, checkpoints, train, release) asks the same questions: is there a process group, what is my
rank, wait for the others, give me the whole of a possibly sharded tensor. One answer each lives here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def is_distributed() -> bool:
    """True inside an initialised process group (torchrun, or a test's spawned ranks)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) outside a process group."""
    import torch.distributed as dist

    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank; nothing to wait for outside a process group."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective: every rank of its mesh must call it), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def rank0_decides(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and give every rank its result, or raise its GlassboxError on every rank (so a
    check that only rank 0 can make stops every rank, instead of leaving the others waiting in a collective)."""
    import torch.distributed as dist

    from glassbox.errors import GlassboxError

    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except GlassboxError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise GlassboxError(value)
    return value
