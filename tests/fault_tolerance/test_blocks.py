"""Blocks: layouts that follow FSDP2 shard boundaries, and reading/writing blocks of a live model and AdamW."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.blocks import BlockId, BlockLayout, FullStateAccess, LocalShardAccess, shard_bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed import run_distributed  # noqa: E402
from scar_core_helpers import tiny_config, train, trained  # noqa: E402


def test_block_id_text_round_trips_and_orders():
    b = BlockId("layers.0.self_attn.q_proj.weight", 0, 64)
    assert str(b) == "layers.0.self_attn.q_proj.weight[0:64]"
    assert BlockId.parse(str(b)) == b and hash(BlockId.parse(str(b))) == hash(b)
    assert sorted([BlockId("a", 8, 9), BlockId("a", 0, 8)])[0].start == 0
    with pytest.raises(GlassboxError, match="not a block"):
        BlockId.parse("a[3]")
    with pytest.raises(GlassboxError, match="start < stop"):
        BlockId("a", 4, 4)


def test_blocks_never_straddle_a_shard_and_cover_every_row():
    shapes = {"emb": (10, 4), "norm": (3,), "w": (7, 2)}
    layout = BlockLayout.build(shapes, world_size=4, rows_per_block=2)
    for name, (rows, *_) in shapes.items():
        covered = []
        for rank in range(4):
            lo, hi = layout.shard_rows(name, rank)
            assert (lo, hi) == shard_bounds(rows, 4, rank)
            mine = [b for b in layout.blocks_of_rank(rank) if b.name == name]
            assert all(lo <= b.start < b.stop <= hi and layout.rank_of(b) == rank for b in mine)
            covered += [r for b in mine for r in range(b.start, b.stop)]
        assert covered == list(range(rows))
    # torch.chunk's sizes: 10 rows over 4 ranks are 3, 3, 3, 1; 3 rows over 4 leave rank 3 empty.
    assert [layout.shard_rows("emb", r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [len(t) for t in torch.chunk(torch.zeros(10), 4)] == [3, 3, 3, 1]
    assert not [b for b in layout.blocks_of_rank(3) if b.name == "norm"]
    assert layout.num_elements(BlockId("emb", 0, 2)) == 8
    assert BlockLayout.from_json(layout.to_json()) == layout
    assert BlockLayout.from_json(layout.to_json()).blocks == layout.blocks


def test_block_elements_sizes_blocks_per_tensor():
    layout = BlockLayout.build({"emb": (96, 8), "norm": (8,)}, world_size=2, block_elements=32)
    assert {layout.num_elements(b) for b in layout.blocks if b.name == "emb"} == {32}     # 4 rows of 8
    assert [b.rows for b in layout.blocks if b.name == "norm"] == [4, 4]                 # one per shard
    with pytest.raises(GlassboxError, match="exactly one"):
        BlockLayout.build({"emb": (4, 4)}, 1)


def test_full_access_reads_and_writes_rows_of_param_and_moments():
    model, opt = trained(steps=2)
    layout = BlockLayout.of_model(model, world_size=2, rows_per_block=5)
    access = FullStateAccess(model, opt, layout)
    assert access.step == 2 and access.blocks == layout.blocks
    block = BlockId("embed_tokens.weight", 5, 10)
    got = access.read(block)
    param = dict(model.named_parameters())["embed_tokens.weight"]
    assert torch.equal(got["param"], param.detach()[5:10])
    assert torch.equal(got["exp_avg_sq"], opt.state[param]["exp_avg_sq"][5:10])
    got["param"] += 1                          # a copy: the live state is untouched
    assert not torch.equal(got["param"], param.detach()[5:10])
    new = {k: torch.full((5, 16), float(i)) for i, k in enumerate(("param", "exp_avg", "exp_avg_sq"))}
    neighbours = param.detach()[:5].clone()
    access.write(block, new)
    assert torch.equal(param.detach()[5:10], new["param"]) and torch.equal(param.detach()[:5], neighbours)
    assert torch.equal(opt.state[param]["exp_avg"][5:10], new["exp_avg"])
    train(model, opt, 1)                       # the written state still trains (no autograd history kept)
    only_rank1 = FullStateAccess(model, opt, layout, ranks=[1])
    assert set(only_rank1.blocks) == set(layout.blocks_of_rank(1))
    with pytest.raises(GlassboxError, match="not held"):
        only_rank1.read(layout.blocks_of_rank(0)[0])
    with pytest.raises(GlassboxError, match="shape"):
        access.write(block, {k: torch.zeros(4, 16) for k in new})


def test_moments_read_as_zeros_before_the_first_step():
    torch.manual_seed(0)
    from glassbox.models.transformer import Transformer

    model = Transformer(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    access = FullStateAccess(model, opt, BlockLayout.of_model(model, 1, rows_per_block=8))
    block = access.blocks[0]
    assert access.step == 0 and not torch.count_nonzero(access.read(block)["exp_avg"])
    with pytest.raises(GlassboxError, match="has not stepped"):
        access.write(block, {k: torch.ones_like(t) for k, t in access.read(block).items()})


def _shard_access_rank(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model, opt = trained(steps=0)
    full_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    layout = BlockLayout.of_model(model, world_size=2, rows_per_block=3)
    access = LocalShardAccess(model, opt, layout, rank)
    assert access.blocks == layout.blocks_of_rank(rank)
    block = access.blocks[-1]
    read = access.read(block)
    full = dict(model.named_parameters())[block.name].full_tensor()
    marker = {k: torch.full_like(t, 7.0 + rank) for k, t in read.items()}
    access.write(block, marker)
    after = dict(model.named_parameters())[block.name].full_tensor()
    return {"block": block, "read_matches": torch.equal(read["param"], full.detach()[block.start:block.stop]),
            "after": after.detach().clone(), "step": access.step, "shapes": {n: tuple(t.shape) for n, t in
                                                                               full_before.items()}}


def test_local_shard_access_on_two_fsdp2_ranks(tmp_path):
    results = run_distributed(_shard_access_rank, 2, tmp_path)
    for rank, r in enumerate(results):
        assert r["read_matches"] and r["step"] == 2
        block = r["block"]
        lo, hi = BlockLayout.build(r["shapes"], 2, rows_per_block=3).shard_rows(block.name, rank)
        assert lo <= block.start < block.stop <= hi
        assert torch.equal(r["after"][block.start:block.stop], torch.full_like(r["after"][block.start:block.stop],
                                                                               7.0 + rank))
