"""The state SCAR protects, cut into blocks: rows of a parameter together with the same rows of its Adam moments.

Under FSDP2 each rank holds a dim-0 shard of every parameter (torch.chunk sizes), and a failure loses exactly the
shards of the failed rank; so a block never straddles a shard boundary, and "the blocks of rank k" is the unit of
loss and of recovery. A `BlockLayout` is a pure function of the full shapes, the world size and the block size,
so it can be recorded as JSON (in a recovery event, in a block store) and rebuilt bit for bit.

`StateAccess` is how the rest of SCAR touches the live state: read a block (CPU fp32 copies of the parameter rows
and both moments) or write one in place. `FullStateAccess` serves a process holding whole tensors (world size 1,
and the in-process benchmark, which can pose as any rank subset of a W-rank layout); `LocalShardAccess` serves
one FSDP2 rank, reading and writing its DTensor local shards.

Contract refinement (scar_contract.md): `BlockLayout.build` also takes `block_elements` (a target element count
per block, rows chosen per tensor) as an alternative to `rows_per_block`, because a fixed row count makes an
embedding block thousands of times larger than a norm block; `FullStateAccess` takes `ranks` to expose only the
blocks of some ranks of the layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

import torch

from glassbox.errors import GlassboxError

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_BLOCK_TEXT = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


@dataclass(frozen=True, order=True)
class BlockId:
    """Rows [start, stop) along dim 0 of the full parameter `name` (and of its moments)."""

    name: str
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise GlassboxError(f"block {self.name}[{self.start}:{self.stop}]: expected 0 <= start < stop")

    def __str__(self) -> str:
        return f"{self.name}[{self.start}:{self.stop}]"

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @classmethod
    def parse(cls, text: str) -> "BlockId":
        m = _BLOCK_TEXT.match(text)
        if m is None:
            raise GlassboxError(f"{text!r} is not a block (expected NAME[START:STOP])")
        return cls(m["name"], int(m["start"]), int(m["stop"]))


@dataclass
class SavedBlock:
    """A stored copy of one block: its tensors (STATE_KEYS, CPU fp32) and the step they are from."""

    step: int
    tensors: dict[str, torch.Tensor]


class BlockUnavailable(GlassboxError):
    """A source cannot give a block (never saved there, file missing, checksum mismatch); names all three."""

    def __init__(self, block: BlockId, where: str, why: str):
        super().__init__(f"block {block} at {where}: {why}")
        self.block, self.where, self.why = block, where, why


def shard_bounds(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of FSDP2 rank `rank` of `world_size` for a dim-0 length `rows` (torch.chunk sizes:
    ceil(rows / world) each, the last ones shorter or empty)."""
    size = -(-rows // world_size)
    return min(rank * size, rows), min((rank + 1) * size, rows)


class BlockLayout:
    """Every block of a state, in a fixed order (parameters in the given order, then rank, then rows)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], world_size: int, rows_per_block: int | None,
                 block_elements: int | None):
        if world_size < 1:
            raise GlassboxError(f"block layout: world_size must be >= 1, got {world_size}")
        if (rows_per_block is None) == (block_elements is None):
            raise GlassboxError("block layout: give exactly one of rows_per_block and block_elements")
        if (rows_per_block or block_elements or 0) < 1:
            raise GlassboxError(f"block layout: block size must be >= 1, got {rows_per_block or block_elements}")
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.world_size = world_size
        self.rows_per_block = rows_per_block
        self.block_elements = block_elements
        self.blocks: list[BlockId] = []
        self._rank: dict[BlockId, int] = {}
        for name, shape in self.shapes.items():
            if len(shape) == 0 or shape[0] == 0:
                raise GlassboxError(f"block layout: parameter {name} has shape {shape}; SCAR blocks need dim 0 >= 1")
            step = rows_per_block or max(1, block_elements // self.row_elements(name))
            for rank in range(world_size):
                lo, hi = shard_bounds(shape[0], world_size, rank)
                for start in range(lo, hi, step):
                    block = BlockId(name, start, min(start + step, hi))
                    self.blocks.append(block)
                    self._rank[block] = rank
        self._by_rank = {r: [b for b in self.blocks if self._rank[b] == r] for r in range(world_size)}

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, ...]], world_size: int, rows_per_block: int | None = None,
              block_elements: int | None = None) -> "BlockLayout":
        return cls(shapes, world_size, rows_per_block, block_elements)

    @classmethod
    def of_model(cls, model: torch.nn.Module, world_size: int, rows_per_block: int | None = None,
                 block_elements: int | None = None) -> "BlockLayout":
        """The layout of `model`'s trainable parameters at their FULL shapes (a DTensor's global shape)."""
        return cls.build(trainable_shapes(model), world_size, rows_per_block, block_elements)

    def row_elements(self, name: str) -> int:
        return math.prod(self.shapes[name][1:])

    def blocks_of_rank(self, rank: int) -> list[BlockId]:
        if rank not in self._by_rank:
            raise GlassboxError(f"block layout: no rank {rank} in a world of {self.world_size}")
        return list(self._by_rank[rank])

    def rank_of(self, block: BlockId) -> int:
        if block not in self._rank:
            raise GlassboxError(f"block {block} is not in this layout")
        return self._rank[block]

    def shard_rows(self, name: str, rank: int) -> tuple[int, int]:
        if name not in self.shapes:
            raise GlassboxError(f"block layout: no parameter {name}")
        return shard_bounds(self.shapes[name][0], self.world_size, rank)

    def num_elements(self, block: BlockId) -> int:
        return block.rows * self.row_elements(block.name)

    def block_shape(self, block: BlockId) -> tuple[int, ...]:
        return (block.rows, *self.shapes[block.name][1:])

    def to_json(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "rows_per_block": self.rows_per_block,
                "block_elements": self.block_elements,
                "shapes": [[name, list(shape)] for name, shape in self.shapes.items()]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BlockLayout":
        try:
            shapes = {str(name): tuple(shape) for name, shape in data["shapes"]}
            return cls(shapes, int(data["world_size"]), data.get("rows_per_block"), data.get("block_elements"))
        except (KeyError, TypeError, ValueError) as e:
            raise GlassboxError(f"not a block layout record ({type(e).__name__}: {e})") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockLayout) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"BlockLayout({len(self.blocks)} blocks, {len(self.shapes)} parameters, world {self.world_size})"


def trainable_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    from glassbox.models.transformer import unwrap

    return {name: tuple(p.shape) for name, p in unwrap(model).named_parameters() if p.requires_grad}


class StateAccess(Protocol):
    """Read and write blocks of a live training state (see the module docstring)."""

    layout: BlockLayout

    @property
    def blocks(self) -> list[BlockId]: ...

    @property
    def step(self) -> int: ...

    def read(self, block: BlockId) -> dict[str, torch.Tensor]: ...

    def write(self, block: BlockId, tensors: Mapping[str, torch.Tensor]) -> None: ...


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return 0


def _check_tensors(block: BlockId, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    for key in STATE_KEYS:
        if key not in tensors:
            raise GlassboxError(f"block {block}: no {key!r} to write")
        if tuple(tensors[key].shape) != shape:
            raise GlassboxError(f"block {block}: {key} has shape {tuple(tensors[key].shape)}, the block is {shape}")


class _RowsAccess:
    """Shared read/write over per-parameter local tensors whose row 0 is full-tensor row `offset`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: BlockLayout):
        from glassbox.models.transformer import unwrap

        self.layout = layout
        self.optimizer = optimizer
        self.params = {n: p for n, p in unwrap(model).named_parameters() if n in layout.shapes}
        missing = [n for n in layout.shapes if n not in self.params]
        if missing:
            raise GlassboxError(f"block layout names parameter {missing[0]!r}, which this model does not have")
        self._blocks: list[BlockId] = []

    @property
    def blocks(self) -> list[BlockId]:
        return list(self._blocks)

    @property
    def step(self) -> int:
        return _optimizer_step(self.optimizer)

    def _local(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def _rows(self, block: BlockId) -> dict[str, torch.Tensor | None]:
        if block not in self._block_set:
            raise GlassboxError(f"block {block} is not held by this process")
        param = self.params[block.name]
        state = self.optimizer.state.get(param, {})
        out: dict[str, torch.Tensor | None] = {}
        for key in STATE_KEYS:
            full = param if key == "param" else state.get(key)
            if full is None:
                out[key] = None
                continue
            local, offset = self._local(full)
            out[key] = local.data[block.start - offset:block.stop - offset]
        return out

    def read(self, block: BlockId) -> dict[str, torch.Tensor]:
        rows = self._rows(block)
        shape = self.layout.block_shape(block)
        return {key: (t.detach().to("cpu", torch.float32, copy=True) if t is not None
                      else torch.zeros(shape, dtype=torch.float32)) for key, t in rows.items()}

    def write(self, block: BlockId, tensors: Mapping[str, torch.Tensor]) -> None:
        rows = self._rows(block)
        _check_tensors(block, tensors, self.layout.block_shape(block))
        with torch.no_grad():
            for key, target in rows.items():
                if target is None:
                    if torch.count_nonzero(tensors[key]):
                        raise GlassboxError(f"block {block}: cannot write {key}: the optimizer has not stepped yet "
                                            "(no moments exist to write into)")
                    continue
                target.copy_(tensors[key].to(target.device, target.dtype))


class FullStateAccess(_RowsAccess):
    """Whole tensors in this process: every block of the layout, or only those of `ranks`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: BlockLayout,
                 ranks: Iterable[int] | None = None):
        super().__init__(model, optimizer, layout)
        for name, p in self.params.items():
            if tuple(p.shape) != layout.shapes[name] or _is_dtensor(p):
                raise GlassboxError(f"parameter {name}: shape {tuple(p.shape)} is not the layout's "
                                    f"{layout.shapes[name]} as a whole tensor")
        chosen = set(ranks) if ranks is not None else None
        self._blocks = [b for b in layout.blocks if chosen is None or layout.rank_of(b) in chosen]
        self._block_set = set(self._blocks)

    def _local(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        return tensor, 0


class LocalShardAccess(_RowsAccess):
    """The DTensor local shards of FSDP2 rank `rank`: only that rank's blocks."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: BlockLayout, rank: int):
        super().__init__(model, optimizer, layout)
        self.rank = rank
        for name, p in self.params.items():
            if tuple(p.shape) != layout.shapes[name]:
                raise GlassboxError(f"parameter {name}: global shape {tuple(p.shape)}, layout says "
                                    f"{layout.shapes[name]}")
            local, offset = self._local(p)
            expected = layout.shard_rows(name, rank)
            if (offset, offset + local.shape[0]) != expected and local.shape[0] > 0:
                raise GlassboxError(f"parameter {name}: rank {rank} holds rows [{offset}, "
                                    f"{offset + local.shape[0]}), the layout's shard is {list(expected)} "
                                    "(not an FSDP2 dim-0 shard of this world size)")
        self._blocks = layout.blocks_of_rank(rank)
        self._block_set = set(self._blocks)

    def _local(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not _is_dtensor(tensor):
            return tensor, 0
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), int(offset[0])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
