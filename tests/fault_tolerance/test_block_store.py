"""The zarr block store: round trips, atomic versions, refusal of missing or corrupt blocks naming them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.block_store import BlockStore
from glassbox.fault_tolerance.blocks import BlockLayout, BlockUnavailable, FullStateAccess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scar_core_helpers import train, trained  # noqa: E402


@pytest.fixture
def live():
    model, opt = trained(steps=2)
    layout = BlockLayout.of_model(model, world_size=2, rows_per_block=4)
    return model, opt, FullStateAccess(model, opt, layout)


def test_round_trip_is_bit_exact_and_a_real_zarr_hierarchy(tmp_path, live):
    import zarr

    _, _, access = live
    store = BlockStore(tmp_path / "blocks", access.layout)
    chosen = access.blocks[:5]
    store.write(2, {b: access.read(b) for b in chosen})
    for b in chosen:
        saved = store.read(b)
        assert saved.step == 2
        for k, t in access.read(b).items():
            assert torch.equal(saved.tensors[k], t), (b, k)
    assert store.saved_steps() == {b: 2 for b in chosen}
    assert store.bytes_written == sum(3 * 4 * access.layout.num_elements(b) for b in chosen)
    root = zarr.open_group(str(tmp_path / "blocks"), mode="r")
    assert BlockLayout.from_json(root.attrs["layout"]) == access.layout
    b = chosen[0]
    array = zarr.open_array(str(store.block_dir(b) / "step_000000002"), mode="r")
    assert array.shape == (3, b.rows, 16) and array.attrs["block"] == str(b)
    # A second store object (another rank, a restarted process) sees the same blocks.
    assert BlockStore(tmp_path / "blocks", access.layout).saved_steps() == store.saved_steps()


def test_a_newer_version_replaces_the_older_and_pins_survive(tmp_path, live):
    model, opt, access = live
    store = BlockStore(tmp_path, access.layout)
    a, b = access.blocks[0], access.blocks[1]
    store.write(2, {a: access.read(a), b: access.read(b)})
    old_a = access.read(a)
    store.pin(b, 2)
    train(model, opt, 1)
    store.write(3, {a: access.read(a), b: access.read(b)})
    assert store.read(a).step == 3 and torch.equal(store.read(a).tensors["param"], access.read(a)["param"])
    assert not (store.block_dir(a) / "step_000000002").exists()
    assert store.read(b, step=2).step == 2                     # pinned: still readable for a replay
    with pytest.raises(BlockUnavailable, match="holds no version of step 2"):
        store.read(a, step=2)
    assert not torch.equal(old_a["param"], store.read(a).tensors["param"])


def test_a_crash_mid_write_leaves_the_previous_version(tmp_path, live):
    model, opt, access = live
    store = BlockStore(tmp_path, access.layout)
    block = access.blocks[3]
    store.write(2, {block: access.read(block)})
    before = store.read(block).tensors
    # What a kill -9 during the next write leaves: a temporary array, half written, never renamed.
    tmp = store.block_dir(block) / ".tmp-step_000000003-12345"
    tmp.mkdir()
    (tmp / "zarr.json").write_text('{"zarr_format": 3, "node_')
    saved = store.read(block)
    assert saved.step == 2 and all(torch.equal(saved.tensors[k], before[k]) for k in before)
    train(model, opt, 1)
    store.write(3, {block: access.read(block)})
    assert store.read(block).step == 3


def test_missing_and_corrupt_blocks_are_refused_naming_them(tmp_path, live):
    _, _, access = live
    store = BlockStore(tmp_path, access.layout)
    good, bad, never = access.blocks[:3]
    store.write(2, {good: access.read(good), bad: access.read(bad)})
    with pytest.raises(BlockUnavailable, match=rf"block {never.name}\[{never.start}:{never.stop}\].*never saved"):
        store.read(never)
    chunk = next(p for p in (store.block_dir(bad) / "step_000000002").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(BlockUnavailable) as err:
        store.read(bad)
    assert err.value.block == bad and "sha256 mismatch" in err.value.why and str(bad) in str(err.value)
    chunk.write_bytes(bytes(data[:10]))                      # truncated
    with pytest.raises(BlockUnavailable, match=r"unreadable|sha256"):
        store.read(bad)
    chunk.unlink()                                           # deleted: zarr would read zeros; the hash refuses them
    with pytest.raises(BlockUnavailable, match="sha256 mismatch"):
        store.read(bad)
    assert store.read(good).step == 2


def test_a_store_of_another_layout_is_refused(tmp_path, live):
    _, _, access = live
    BlockStore(tmp_path, access.layout)
    other = BlockLayout.build(access.layout.shapes, world_size=4, rows_per_block=4)
    with pytest.raises(GlassboxError, match="another layout"):
        BlockStore(tmp_path, other)
    (tmp_path / "zarr.json").write_text(json.dumps({"attributes": {}}))
    with pytest.raises(GlassboxError, match="not a glassbox block store"):
        BlockStore(tmp_path, access.layout)
    with pytest.raises(GlassboxError, match="not in this layout"):
        BlockStore(tmp_path / "new", BlockLayout.build(access.layout.shapes, 2, rows_per_block=5)).write(1, {access.blocks[0]: access.read(access.blocks[0])})
