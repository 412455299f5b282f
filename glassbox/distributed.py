"""Where this process stands in a torch.distributed job, for code that must also run as a single process.

Every area (data, checkpoints, train, release) asks the same questions: is there a process group, what is my
rank, wait for the others, give me the whole of a possibly sharded tensor. One answer each lives here.
"""

from __future__ import annotations

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
