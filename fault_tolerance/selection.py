"""Which blocks a partial checkpoint writes: SCAR's prioritized choice and its two baselines at the same I/O.

What a block's loss costs. If a rank fails now, recovery puts back, for each of its blocks, the newest version any
source holds: the block's last saved copy, or, for a block never saved, what the run falls back to (the initial
state, or the last full checkpoint). The perturbation is delta = x_restored - x_now, and SCAR's bound says rework
grows with ||delta||. So a block's priority is measured against its *restore source* (what recovery would put
back), not against "its last save": for a never-saved block that is its distance from the fallback, a finite
number like any other. (Giving never-saved blocks infinite priority, as a first version did, makes prioritized
selection spend its first cycle writing blocks in layout order exactly as round-robin does, whether or not they
moved; in short runs that cycle is most of the run.) The caller passes the restore sources; a block missing from
them is refused, since its priority would be a guess.

Which blocks minimise ||delta||. A rank's loss loses all its blocks, so ||delta||^2 = sum_b ||Delta_b||^2 over the
rank's blocks, Delta_b = x_b(now) - x_b(restore source). Writing block b now removes its term and costs size_b
elements of the budget. Minimising the sum at a fixed element budget is a knapsack whose items weigh size_b and
are worth ||Delta_b||^2; greedy by value per weight, ||Delta_b||^2 / size_b, is its optimum when the last item may
be split and within one block of it otherwise (the budget already allows crossing the line by one block). Ranking
by ||Delta_b|| alone would be the same order when all blocks have one size, but with unequal blocks it favours the
large ones (an embedding block's change is large because it has many elements, not because each moved much), and
it ranks by the norm where the sum that matters is of squares.

Round-robin (a cursor over the layout) and random (a fresh permutation each call) spend the same budget without
looking at the state.

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


def priority(now: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], size: int) -> float:
    """||Delta||^2 per element written: the share of the expected ||delta||^2 that writing this block removes, per
    element of I/O it costs (the knapsack ratio of the module docstring)."""
    return change_norm(now, source) ** 2 / size


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

    def _order(self, access: StateAccess, restore_source: Mapping[BlockId, Mapping[str, torch.Tensor]],
               sizes: Mapping[BlockId, int]) -> list[BlockId]:
        blocks = access.blocks
        if self.strategy == "round_robin":
            start = self.cursor % len(blocks)
            return blocks[start:] + blocks[:start]
        if self.strategy == "random":
            return [blocks[i] for i in torch.randperm(len(blocks), generator=self.generator).tolist()]
        missing = [b for b in blocks if b not in restore_source]
        if missing:
            raise GlassboxError(f"prioritized selection: no restore source for {len(missing)} block(s), first "
                                f"{missing[0]}: pass what recovery would put back for every block (its saved copy, "
                                "else the initial state or last full checkpoint)")
        score = {b: priority(access.read(b), restore_source[b], sizes[b]) for b in blocks}
        # Stable: equal scores keep layout order, so ties never depend on hash order.
        return sorted(blocks, key=lambda b: -score[b])

    def select(self, access: StateAccess,
               restore_source: Mapping[BlockId, Mapping[str, torch.Tensor]]) -> list[BlockId]:
        """The blocks to write now, in the order chosen (highest priority first for `prioritized`).

        `restore_source` maps every block to the version recovery would restore if it were lost now (its newest
        saved copy, else the run's fallback state); only `prioritized` reads it."""
        blocks = access.blocks
        if not blocks:
            return []
        sizes = {b: access.layout.num_elements(b) for b in blocks}
        budget = self.fraction * sum(sizes.values()) + self.carry
        chosen: list[BlockId] = []
        spent = 0
        for block in self._order(access, restore_source, sizes):
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
