"""Partial recovery from real sources: glassbox checkpoints (written by the Checkpointer) and the zarr block store."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from glassbox.checkpoints.checkpointer import Checkpointer
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.block_store import BlockStore
from glassbox.fault_tolerance.blocks import STATE_KEYS, BlockLayout, BlockUnavailable, FullStateAccess
from glassbox.fault_tolerance.recovery import (
    CheckpointSource, RecoveryEvent, SnapshotSource, apply_event, predicted_rework, recover_blocks,
)
from glassbox.train.state import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scar_core_helpers import train, trained  # noqa: E402

QUIET = dict(log=lambda m: None)


def _state(tmp_path, model, opt, step):
    return TrainState(config=None, run_dir=tmp_path, model=model, optimizer=opt, lr_scheduler=None, sampler=None,
                      step_plan=None, step=step)


@pytest.fixture
def run(tmp_path):
    """A model trained 2 steps and checkpointed in full, then 1 more step and a partial checkpoint of the MLP."""
    model, opt = trained(steps=2)
    layout = BlockLayout.of_model(model, world_size=2, rows_per_block=4)
    access = FullStateAccess(model, opt, layout)
    ckpt = Checkpointer(CheckpointConfig(), tmp_path, **QUIET)
    ckpt.save(_state(tmp_path, model, opt, 2))
    at2 = {b: access.read(b) for b in layout.blocks}
    train(model, opt, 1)
    partial = ckpt.save(_state(tmp_path, model, opt, 3), keys=["layers.0.mlp.*"])
    at3 = {b: access.read(b) for b in layout.blocks}
    return model, opt, access, partial, at2, at3


def test_checkpoint_source_gives_each_tensor_rows_with_its_own_step(run):
    _, _, access, partial, at2, at3 = run
    source = CheckpointSource(partial)
    assert source.step == 3
    for block in access.blocks:
        saved = source.read(block)
        expected_step = 3 if ".mlp." in block.name else 2
        expected = at3 if expected_step == 3 else at2
        assert saved.step == expected_step, block
        for k in STATE_KEYS:
            assert torch.equal(saved.tensors[k], expected[block][k]), (block, k)
    with pytest.raises(BlockUnavailable, match="holds .* of step 2, not 3"):
        source.read(access.blocks[0], step=3)


def test_recovery_restores_lost_blocks_from_the_newest_source_and_leaves_survivors(tmp_path, run):
    model, opt, access, partial, at2, at3 = run
    store = BlockStore(tmp_path / "blocks", access.layout)
    train(model, opt, 2)                                        # now at step 5
    lost_rank = 1
    lost = access.layout.blocks_of_rank(lost_rank)
    in_store = lost[::3]
    store.write(5, {b: access.read(b) for b in in_store})
    at5 = {b: access.read(b) for b in access.blocks}
    train(model, opt, 1)                                        # the failure happens at step 6
    before = {b: access.read(b) for b in access.blocks}
    with torch.no_grad():                                       # the lost rank's memory is gone
        for b in lost:
            access.write(b, {k: torch.full_like(t, float("nan")) for k, t in before[b].items()})
    sources = [store, CheckpointSource(partial)]
    event = recover_blocks(access, lost, sources, step=6, lost_ranks=[lost_rank], before=before,
                           progress_norm=2.0, **QUIET)
    for b in access.blocks:
        now = access.read(b)
        if b not in lost:
            expected = before[b]                                 # survivors: bit for bit their own values
        elif b in in_store:
            expected = at5[b]
        else:
            expected = at3[b] if ".mlp." in b.name else at2[b]
        for k in STATE_KEYS:
            assert torch.equal(now[k], expected[k]), (b, k)
    steps = event.source_steps()
    assert {steps[b] for b in in_store} == {5}
    assert all(steps[b] in (2, 3) for b in lost if b not in in_store)
    assert {r.source for r in event.restored if r.source_step == 5} == {"block_store"}
    delta = math.sqrt(sum(float(torch.sum((access.read(b)[k].double() - before[b][k].double()) ** 2))
                          for b in lost for k in STATE_KEYS))
    assert event.delta_norm == pytest.approx(delta, rel=1e-12) and event.delta_norm > 0
    assert event.delta_rel == pytest.approx(delta / event.theta_norm)
    assert event.predicted_rework == pytest.approx(math.log1p(delta / 2.0))
    assert predicted_rework(None, 2.0) is None


def test_a_corrupt_block_is_refused_by_name_and_the_next_source_used(tmp_path, run):
    model, opt, access, partial, at2, at3 = run
    store = BlockStore(tmp_path / "blocks", access.layout)
    lost = access.layout.blocks_of_rank(0)[:4]
    store.write(3, {b: access.read(b) for b in lost})
    bad = lost[1]
    chunk = next(p for p in (store.block_dir(bad) / "step_000000003").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x01
    chunk.write_bytes(bytes(data))
    logged: list[str] = []
    event = recover_blocks(access, lost, [store, CheckpointSource(partial)], step=3, lost_ranks=[0],
                           log=logged.append)
    by_block = {r.block: r for r in event.restored}
    assert by_block[str(bad)].source.startswith("checkpoint") and by_block[str(bad)].source_step == 2
    assert all(by_block[str(b)].source == "block_store" for b in lost if b != bad)
    assert any(str(bad) in line and "sha256 mismatch" in line for line in logged)
    assert any(str(bad) in r and "sha256" in r for r in event.refusals)
    for k in STATE_KEYS:
        assert torch.equal(access.read(bad)[k], at2[bad][k])


def test_a_corrupt_checkpoint_tensor_is_refused_and_no_source_left_is_an_error(tmp_path, run):
    _, _, access, partial, _, _ = run
    base = partial.parent / "step_000002"
    manifest = json.loads((base / "MANIFEST.json").read_text())
    rel, offset, _, _ = manifest["tensors"]["embed_tokens.weight"]["chunks"][0]
    path = base / rel
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    block = access.layout.blocks[0]
    assert block.name == "embed_tokens.weight"
    with pytest.raises(BlockUnavailable, match=r"embed_tokens\.weight.*sha256 mismatch"):
        CheckpointSource(partial).read(block)
    with pytest.raises(GlassboxError, match=r"block embed_tokens\.weight\[0:4\]: no source can restore it"):
        recover_blocks(access, [block], [CheckpointSource(partial), BlockStore(tmp_path / "b", access.layout)],
                       step=3, lost_ranks=[0], **QUIET)


def test_apply_event_replays_a_recovery_bit_exactly(tmp_path, run):
    model, opt, access, partial, _, _ = run
    store = BlockStore(tmp_path / "blocks", access.layout)
    lost = access.layout.blocks_of_rank(1)
    train(model, opt, 1)
    store.write(4, {b: access.read(b) for b in lost[::2]})
    replay_model = copy.deepcopy(model)
    replay_opt = torch.optim.AdamW(replay_model.parameters(), lr=1e-2)
    replay_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.manual_seed(11)
    train(model, opt, 1)
    snapshot = SnapshotSource.of_access("snapshot@4", FullStateAccess(replay_model, replay_opt, access.layout))
    event = recover_blocks(access, lost, [store, CheckpointSource(partial), snapshot], step=5, lost_ranks=[1],
                           **QUIET)
    store.write(5, {b: access.read(b) for b in lost})           # later partial saves must not lose the pinned ones
    recorded = RecoveryEvent.from_json(json.loads(json.dumps(event.to_json())))
    assert recorded == event
    replay_access = FullStateAccess(replay_model, replay_opt, access.layout)
    torch.manual_seed(11)                                       # the replay takes the same step on the same data
    train(replay_model, replay_opt, 1)
    apply_event(replay_access, recorded, [store, CheckpointSource(partial), snapshot])
    for (name, a), b in zip(model.named_parameters(), replay_model.parameters()):
        assert torch.equal(a, b), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][k], replay_opt.state[b][k]), (name, k)
    with pytest.raises(GlassboxError, match="not among the sources"):
        apply_event(replay_access, recorded, [store])
