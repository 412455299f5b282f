"""The sampler: megatron's order, independence from world size and batch size, resume, refusal, blending."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from glassbox.data.config import BlendSource, DataConfig
from glassbox.data.indices import Component, EpochSpec
from glassbox.data.prepare import prepare
from glassbox.data.sampler import build_sampler
from glassbox.data.store import TokenStore, megatron_datasets
from glassbox.errors import GlassboxError

SEQ = 64


def _cfg(path, seq_len=SEQ, seed=7) -> DataConfig:
    return DataConfig(path=str(path), seq_len=seq_len, seed=seed)


def test_samples_are_megatron_gpt_dataset_samples(prepared_data, tmp_path):
    """Our memory-mapped reader returns exactly what megatron's own GPTDataset.__getitem__ returns."""
    md = megatron_datasets()
    sampler = build_sampler(_cfg(prepared_data), cache_dir=tmp_path / "cache")
    store = TokenStore(prepared_data)
    spec = EpochSpec((Component("", "", 1.0, store.eod_id, store.vocab_size),), "train", SEQ, 7, 0, None)

    class Tok:
        eod, vocab_size, unique_identifiers = store.eod_id, store.vocab_size, {"test": 1}

    config = md.gpt_dataset.GPTDatasetConfig(
        random_seed=spec.random_seed, sequence_length=SEQ, blend=([str(store.prefix("train"))], None), split="1,0,0",
        path_to_cache=str(tmp_path / "megatron"), tokenizer=Tok(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    indexed = md.indexed_dataset.IndexedDataset(str(store.prefix("train")))
    gpt = md.gpt_dataset.GPTDataset(
        indexed, str(store.prefix("train")), np.arange(len(indexed), dtype=np.int32), None,
        md.utils.Split.train, config,
    )
    assert len(gpt) == sampler.epoch_size == (store.split_tokens("train") - 1) // SEQ
    ours = sampler.samples(0, len(gpt))
    for i in range(0, len(gpt), 7):
        item = gpt[i]
        assert torch.equal(ours[i], torch.cat([item["tokens"], item["labels"][-1:]]))


def test_global_batches_are_the_same_for_world_sizes_1_2_4_and_any_batch_sizes(prepared_data, tmp_path):
    batch_sizes = [8, 4, 12, 16, 4, 8]
    reference = build_sampler(_cfg(prepared_data), cache_dir=tmp_path)
    expected = [reference.next_batch(b) for b in batch_sizes]
    assert [b.start for b in expected] == list(np.cumsum([0] + batch_sizes[:-1]))
    assert reference.cursor == sum(batch_sizes)
    for world in (2, 4):
        ranks = [build_sampler(_cfg(prepared_data), cache_dir=tmp_path) for _ in range(world)]
        for step, b in enumerate(batch_sizes):
            slices = [ranks[r].next_batch(b, dp_rank=r, dp_world=world) for r in range(world)]
            assert all(s.start == expected[step].start and s.size == b for s in slices)
            assert all(s.tokens.shape == (b // world, SEQ + 1) and s.tokens.dtype == torch.long for s in slices)
            assert torch.equal(torch.cat([s.tokens for s in slices]), expected[step].tokens)
        assert all(r.cursor == reference.cursor for r in ranks)
    # A batch is a window of the global order, whatever the batch sizes before it.
    whole = reference.samples(0, sum(batch_sizes))
    assert torch.equal(torch.cat([b.tokens for b in expected]), whole)
    with pytest.raises(GlassboxError, match="not divisible"):
        reference.next_batch(6, dp_rank=0, dp_world=4)


def test_epochs_follow_each_other_reshuffled(prepared_data, tmp_path):
    sampler = build_sampler(_cfg(prepared_data, seq_len=256), cache_dir=tmp_path)
    n = sampler.epoch_size
    first, second = sampler.samples(0, n), sampler.samples(n, n)
    assert not torch.equal(first, second)
    # Each epoch covers the whole split once: its samples (less the one-token overlap between neighbours) use
    # every stored token at most once and leave out less than one sample's worth.
    store = TokenStore(prepared_data)
    all_ids = np.bincount(np.memmap(store.prefix("train").with_suffix(".bin"), dtype=store.dtype, mode="r"))
    for epoch in (first, second):
        used = np.bincount(epoch[:, :-1].reshape(-1).numpy(), minlength=len(all_ids))
        assert (used <= all_ids).all() and all_ids.sum() - used.sum() <= 256
    straddle = sampler.samples(n - 2, 4)
    assert torch.equal(straddle, torch.cat([first[-2:], second[:2]]))
    sampler.cursor = 3 * n + 1
    assert sampler.state_dict()["epoch"] == 3


def test_resume_from_state_gives_the_same_following_batches(prepared_data, tmp_path):
    a = build_sampler(_cfg(prepared_data), cache_dir=tmp_path)
    for b in (8, 16, 8):
        a.next_batch(b)
    state = a.state_dict()
    assert (state["cursor"], state["epoch"], state["seed"], state["seq_len"]) == (32, 0, 7, SEQ)
    follow = [a.next_batch(b).tokens for b in (4, 12)]
    resumed = build_sampler(_cfg(prepared_data), cache_dir=tmp_path)
    resumed.load_state_dict(state)
    assert resumed.cursor == 32
    assert all(torch.equal(x, resumed.next_batch(b).tokens) for x, b in zip(follow, (4, 12)))


def test_refuses_state_from_a_changed_store_unless_allowed(prepared_data, tmp_path):
    state = build_sampler(_cfg(prepared_data), cache_dir=tmp_path).state_dict()
    state["cursor"] = 40
    other = tmp_path / "other"
    prepare(["stdlib"], other, vocab_size=300, max_bytes=40_000, progress=False)
    changed = build_sampler(_cfg(other), cache_dir=tmp_path)
    with pytest.raises(GlassboxError) as err:
        changed.load_state_dict(state)
    assert str(prepared_data) in str(err.value) and "fingerprint" in str(err.value)
    assert state["fingerprint"][:12] in str(err.value) and changed.fingerprint[:12] in str(err.value)
    changed.load_state_dict(state, allow_fingerprint_change=True)
    assert changed.cursor == 40
    with pytest.raises(GlassboxError, match="seq_len changed from 64"):
        build_sampler(_cfg(prepared_data, seq_len=32), cache_dir=tmp_path).load_state_dict(state)


def test_seed_and_split_change_the_order(prepared_data, tmp_path):
    base = build_sampler(_cfg(prepared_data), cache_dir=tmp_path).samples(0, 8)
    assert not torch.equal(base, build_sampler(_cfg(prepared_data, seed=8), cache_dir=tmp_path).samples(0, 8))
    valid = build_sampler(_cfg(prepared_data), split="valid", cache_dir=tmp_path)
    assert valid.epoch_size == (TokenStore(prepared_data).split_tokens("valid") - 1) // SEQ
    train_rows = set(map(tuple, build_sampler(_cfg(prepared_data), cache_dir=tmp_path).samples(0, 500).tolist()))
    assert not train_rows & set(map(tuple, valid.samples(0, valid.epoch_size).tolist()))


def test_index_cache_is_keyed_by_content_and_reused(store_copy, tmp_path):
    first = build_sampler(_cfg(store_copy))
    layout = next((store_copy / "cache").glob("*/layout.json"))
    stamp = layout.stat().st_mtime_ns
    moved = tmp_path / "moved"
    shutil.copytree(store_copy, moved)
    again = build_sampler(_cfg(moved), cache_dir=store_copy / "cache")
    assert layout.stat().st_mtime_ns == stamp and len(list((store_copy / "cache").glob("*/layout.json"))) == 1
    assert torch.equal(first.samples(0, 16), again.samples(0, 16))


def test_blend_weights_are_honoured(prepared_data, tmp_path):
    # Store B holds only words over a three-letter alphabet: a sample is B's iff all its ids occur in B.
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join("".join(rng.choice(list("qxj"), 4)) for _ in range(12)) for _ in range(400))
    (tmp_path / "b.txt").write_text(text)
    store_b = tmp_path / "b"
    prepare([str(tmp_path / "b.txt")], store_b, tokenizer=prepared_data / "tokenizer.json", valid_fraction=0.0,
            progress=False)
    b_ids = set(np.asarray(np.memmap(store_b / "train.bin", dtype=TokenStore(store_b).dtype, mode="r")).tolist())
    def blend(weight_a: float) -> DataConfig:
        sources = [BlendSource(str(prepared_data), weight_a), BlendSource(str(store_b), 1.0)]
        return DataConfig(blend=sources, seq_len=32, seed=3)

    cfg = blend(3.0)
    sampler = build_sampler(cfg, cache_dir=tmp_path / "cache")
    rows = sampler.samples(0, 2000).tolist()
    share_b = sum(set(r) <= b_ids for r in rows) / len(rows)
    assert abs(share_b - 0.25) < 0.02, share_b
    assert sampler.fingerprint not in (TokenStore(prepared_data).fingerprint, TokenStore(store_b).fingerprint)
    reweighted = blend(1.0)
    with pytest.raises(GlassboxError, match=r"blend\[0\].weight 3.0 -> 1.0"):
        build_sampler(reweighted, cache_dir=tmp_path / "cache").load_state_dict(sampler.state_dict())


def test_builds_in_a_child_process_inside_an_initialized_process_group(prepared_data, tmp_path):
    """Under torchrun a default process group exists; building must not make collective calls on it."""
    import torch.distributed as dist

    expected = build_sampler(_cfg(prepared_data, seq_len=48), cache_dir=tmp_path / "a").samples(0, 8)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        got = build_sampler(_cfg(prepared_data, seq_len=48), cache_dir=tmp_path / "b").samples(0, 8)
    finally:
        dist.destroy_process_group()
    assert torch.equal(expected, got)


def test_config_and_store_errors(prepared_data, tmp_path):
    with pytest.raises(GlassboxError, match="no such directory"):
        build_sampler(_cfg(tmp_path / "absent"))
    with pytest.raises(GlassboxError, match="exactly one of"):
        build_sampler(DataConfig(seq_len=8))
    with pytest.raises(GlassboxError, match="too few for one sample"):
        build_sampler(_cfg(prepared_data, seq_len=10_000_000), split="valid", cache_dir=tmp_path)
    with pytest.raises(GlassboxError, match="unknown split"):
        build_sampler(_cfg(prepared_data), split="test", cache_dir=tmp_path)
