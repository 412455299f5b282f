"""Which blocks a partial checkpoint writes: SCAR's prioritized choice and its two baselines at the same I/O.

SCAR's bound says a recovery's rework grows with ||x_restored - x_lost||, so with a fixed write budget the blocks
worth writing are those that moved most since their saved copy (priority = ||x_block(now) - x_block(saved)|| over
the parameter rows and both Adam moments; a block never saved has infinite priority). Round-robin (a cursor over
the layout) and random (a fresh permutation each call) spend the same budget without looking at the state.

The budget is counted in elements, not blocks, because blocks differ in size (an embedding block is wider than a
norm block): each call may spend `fraction` of the state's elements plus what earlier calls left unspent (or
minus what they overspent, since the last chosen block may cross the line). So after k calls every strategy has
written k * fraction * total elements to within one block: equal I/O, whatever they choose. With blocks of one
size and an integral fraction * len(blocks) that is exactly that many blocks per call (the contract's count).

`state_dict()` holds the round-robin cursor, the random generator and the carried budget, so a resumed run
selects exactly as one that never stopped.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.blocks import STATE_KEYS, BlockId, StateAccess

STRATEGIES = ("prioritized", "round_robin", "random")


def change_norm(now: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> float:
    """||now - saved|| over the parameter rows and both moments of one block (one vector of all three)."""
    # Per-key fp32 norms (fast; a block is small enough that fp32 accumulation is exact to ~1e-6 relative).
    return math.sqrt(sum(float(torch.linalg.vector_norm(now[k] - saved[k])) ** 2 for k in STATE_KEYS))


class BlockSelector:
    """Chooses `fraction` of the state (by elements) per call; see the module docstring."""

    def __init__(self, strategy: str, fraction: float, seed: int = 0):
        if strategy not in STRATEGIES:
            raise GlassboxError(f"selection strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if not 0 < fraction <= 1:
            raise GlassboxError(f"selection fraction {fraction}: expected 0 < fraction <= 1")
        self.strategy = strategy
        self.fraction = float(fraction)
        self.seed = seed
        self.cursor = 0
        self.carry = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    def _order(self, access: StateAccess, saved: Mapping[BlockId, Mapping[str, torch.Tensor]]) -> list[BlockId]:
        blocks = access.blocks
        if self.strategy == "round_robin":
            start = self.cursor % len(blocks)
            return blocks[start:] + blocks[:start]
        if self.strategy == "random":
            return [blocks[i] for i in torch.randperm(len(blocks), generator=self.generator).tolist()]
        priority = {b: change_norm(access.read(b), saved[b]) if b in saved else math.inf for b in blocks}
        # Stable: equal priorities (never-saved blocks) keep layout order, so ties never depend on hash order.
        return sorted(blocks, key=lambda b: -priority[b])

    def select(self, access: StateAccess, saved: Mapping[BlockId, Mapping[str, torch.Tensor]]) -> list[BlockId]:
        """The blocks to write now, in the order chosen (highest priority first for `prioritized`)."""
        blocks = access.blocks
        if not blocks:
            return []
        sizes = {b: access.layout.num_elements(b) for b in blocks}
        budget = self.fraction * sum(sizes.values()) + self.carry
        chosen: list[BlockId] = []
        spent = 0
        for block in self._order(access, saved):
            if spent >= budget:
                break
            chosen.append(block)
            spent += sizes[block]
        self.carry = budget - spent
        if self.strategy == "round_robin":
            self.cursor = (self.cursor + len(chosen)) % len(blocks)
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "fraction": self.fraction, "seed": self.seed, "cursor": self.cursor,
                "carry": self.carry, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("strategy") != self.strategy or state.get("fraction") != self.fraction:
            raise GlassboxError(f"selector state is for {state.get('strategy')} at fraction {state.get('fraction')}, "
                                f"this selector is {self.strategy} at {self.fraction}")
        self.cursor = int(state["cursor"])
        self.carry = float(state["carry"])
        self.generator.set_state(state["generator"])

