"""Real multi-process tests: run a function on N spawned ranks joined by a real process group.

gloo on the CPU (one thread per rank: the test machine is small and ranks would fight for cores) or NCCL with
one GPU per rank. Each rank's return value comes back through a file, and a rank's traceback is kept beside it.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    else:
        torch.set_num_threads(1)
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, out_dir: Path, *args: Any, backend: str = "gloo") -> list[Any]:
    """Run fn(rank, *args) on `world` spawned ranks; returns their results, rank order. `fn` must be importable
    by name (a module-level function) since each rank is a fresh interpreter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, free_port(), backend, fn, args, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
