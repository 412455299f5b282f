"""Block selection: prioritized picks the largest ||Delta||^2 per element, Delta measured from what recovery would
restore (never-saved blocks from the baseline); all strategies spend the same I/O; resume is exact."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.blocks import BlockLayout, FullStateAccess
from glassbox.fault_tolerance.selection import STRATEGIES, BlockSelector, change_norm, priority

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scar_core_helpers import train, trained  # noqa: E402


def _access(rows_per_block=None, block_elements=None, steps=2):
    model, opt = trained(steps=steps)
    layout = BlockLayout.of_model(model, world_size=2, rows_per_block=rows_per_block, block_elements=block_elements)
    return model, opt, FullStateAccess(model, opt, layout)


def _sizes(access):
    return {b: access.layout.num_elements(b) for b in access.blocks}


def test_prioritized_picks_the_largest_change_per_element():
    model, opt, access = _access(rows_per_block=4)
    saved = {b: access.read(b) for b in access.blocks}
    train(model, opt, 3)
    # Make a few blocks move by much more than training moved anything.
    movers = [access.blocks[i] for i in (3, 17, 30)]
    for i, b in enumerate(movers):
        now = access.read(b)
        access.write(b, {**now, "param": now["param"] + 10.0 * (i + 1)})
    sizes = _sizes(access)
    score = {b: change_norm(access.read(b), saved[b]) ** 2 / sizes[b] for b in access.blocks}
    selector = BlockSelector("prioritized", fraction=0.2)
    chosen = selector.select(access, saved)
    assert chosen[:3] == movers[::-1]                     # the largest change per element first
    ranked = sorted(access.blocks, key=lambda b: -score[b])
    assert chosen == ranked[:len(chosen)]                  # and then exactly the next-largest ones
    assert min(score[b] for b in chosen) >= max(score[b] for b in access.blocks if b not in chosen)


def test_a_small_block_that_moved_more_per_element_beats_a_large_one():
    """The knapsack ratio, not the absolute change: a wide block whose ||Delta|| is larger only because it has
    more elements loses to a narrow block that moved more per element."""
    _, _, access = _access(rows_per_block=4)
    sizes = _sizes(access)
    small = min(access.blocks, key=lambda b: sizes[b])
    large = max(access.blocks, key=lambda b: sizes[b])
    assert sizes[large] >= 4 * sizes[small]
    sources = {b: access.read(b) for b in access.blocks}
    for block, step in ((small, 1.0), (large, 0.7)):
        now = access.read(block)
        access.write(block, {**now, "param": now["param"] + step})
    assert change_norm(access.read(large), sources[large]) > change_norm(access.read(small), sources[small])
    assert priority(access.read(small), sources[small], sizes[small]) > \
        priority(access.read(large), sources[large], sizes[large])
    chosen = BlockSelector("prioritized", fraction=sizes[small] / sum(sizes.values())).select(access, sources)
    assert chosen == [small]


def test_never_saved_blocks_rank_by_their_distance_from_the_baseline():
    """A block no checkpoint holds would be restored from the baseline (the initial state here): its priority is
    its distance from that, so an unchanged never-saved block ranks below a saved one that moved."""
    model, opt, access = _access(rows_per_block=4)
    baseline = {b: access.read(b) for b in access.blocks}
    train(model, opt, 3)
    never_saved = access.blocks[:4]
    saved = {b: access.read(b) for b in access.blocks[4:]}
    still, moved = never_saved[0], never_saved[1]
    access.write(still, baseline[still])                   # back at the baseline: nothing to lose
    now = access.read(moved)
    access.write(moved, {**now, "param": now["param"] + 5.0})
    mover = access.blocks[10]                              # a saved block that moved since its save
    now = access.read(mover)
    access.write(mover, {**now, "param": now["param"] + 3.0})
    sources = {**baseline, **saved}
    order = BlockSelector("prioritized", fraction=1.0).select(access, sources)
    assert order[:2] == [moved, mover]
    assert change_norm(access.read(still), sources[still]) == 0
    assert order.index(still) > order.index(mover)
    with pytest.raises(GlassboxError, match="no restore source"):
        BlockSelector("prioritized", fraction=0.5).select(access, saved)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_equal_io_across_strategies_with_unequal_blocks(fraction):
    """Blocks of different sizes (norm rows vs projection rows): after k calls every strategy has written
    k * fraction * total elements to within one block, so the strategies are compared at equal I/O."""
    model, opt, access = _access(rows_per_block=3)
    sizes = {b: access.layout.num_elements(b) for b in access.blocks}
    assert len(set(sizes.values())) > 3
    total, biggest = sum(sizes.values()), max(sizes.values())
    selectors = {s: BlockSelector(s, fraction, seed=1) for s in STRATEGIES}
    saved = {s: {b: access.read(b) for b in access.blocks} for s in STRATEGIES}     # the baseline, then saves
    written = {s: 0 for s in STRATEGIES}
    for call in range(1, 13):
        train(model, opt, 1)
        for s, selector in selectors.items():
            chosen = selector.select(access, saved[s])
            assert len(set(chosen)) == len(chosen)
            written[s] += sum(sizes[b] for b in chosen)
            saved[s].update({b: access.read(b) for b in chosen})
            assert abs(written[s] - call * fraction * total) <= biggest
    spread = max(written.values()) - min(written.values())
    assert spread <= biggest < 0.05 * 12 * fraction * total


def test_equal_size_blocks_give_the_contract_count():
    """Blocks of one size: ceil(fraction * len(blocks)) per call, and no carried budget when that is integral."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 32, bias=False), torch.nn.Linear(32, 16, bias=False))
    opt = torch.optim.AdamW(model.parameters())
    layout = BlockLayout.build({"0.weight": (32, 4), "1.weight": (16, 32)}, 2, block_elements=64)
    access = FullStateAccess(model, opt, layout)
    assert len(access.blocks) == 2 + 8 and {layout.num_elements(b) for b in access.blocks} == {64}
    selector = BlockSelector("random", 0.5, seed=3)
    for _ in range(4):
        assert len(selector.select(access, {})) == math.ceil(0.5 * 10) and selector.carry == 0


def test_round_robin_cycles_and_random_differs_by_seed():
    _, _, access = _access(rows_per_block=4)
    rr = BlockSelector("round_robin", 0.25)
    seen = []
    while len(set(seen)) < len(access.blocks):
        seen += rr.select(access, {})
    assert seen[:len(access.blocks)] == access.blocks
    a = BlockSelector("random", 0.25, seed=1).select(access, {})
    b = BlockSelector("random", 0.25, seed=2).select(access, {})
    assert a != b and a != access.blocks[:len(a)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_dict_resumes_exactly(strategy):
    model, opt, access = _access(rows_per_block=3)
    straight = BlockSelector(strategy, 0.3, seed=5)
    saved = {b: access.read(b) for b in access.blocks}
    for _ in range(3):
        saved.update({b: access.read(b) for b in straight.select(access, saved)})
    state = straight.state_dict()
    resumed = BlockSelector(strategy, 0.3, seed=99)
    resumed.load_state_dict(state)
    train(model, opt, 1)
    assert resumed.select(access, saved) == straight.select(access, saved)
    with pytest.raises(GlassboxError, match="selector state"):
        BlockSelector("random" if strategy != "random" else "round_robin", 0.3).load_state_dict(state)


def test_bad_strategy_or_fraction_is_refused():
    with pytest.raises(GlassboxError, match="strategy"):
        BlockSelector("largest", 0.1)
    with pytest.raises(GlassboxError, match="fraction"):
        BlockSelector("random", 0.0)
    assert torch.isfinite(torch.tensor(change_norm(*[{k: torch.ones(2) for k in ("param", "exp_avg",
                                                                                  "exp_avg_sq")}] * 2)))
