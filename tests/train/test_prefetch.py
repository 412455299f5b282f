"""The batch prefetcher hands out exactly the batches (and data-order hashes) the sampler itself would."""

from __future__ import annotations

from pathlib import Path

import torch

from glassbox.data.config import DataConfig
from glassbox.data.order_log import batch_hash
from glassbox.data.sampler import build_sampler
from glassbox.train.prefetch import BatchPrefetcher


def _sampler(data_dir: Path):
    return build_sampler(DataConfig(path=str(data_dir), seq_len=32, seed=3), "train")


def test_prefetched_batches_match_the_sampler_through_size_changes_and_a_restore(prepared_data: Path):
    sizes = [8, 8, 4, 12, 8, 8]
    reference = _sampler(prepared_data)
    expected = []
    for size in sizes:
        batch = reference.next_batch(size, dp_rank=1, dp_world=2)
        expected.append((batch.start, batch.tokens, batch_hash(reference.samples(batch.start, size))))

    sampler = _sampler(prepared_data)
    prefetcher = BatchPrefetcher(dp_rank=1, dp_world=2, pin=False, digest=True)
    got = []
    for i, size in enumerate(sizes):
        batch, digest = prefetcher.next_batch(sampler, size)
        got.append((batch.start, batch.tokens, digest))
        # Prefetch a wrong size before a size change: it must be dropped, not used.
        prefetcher.prefetch(sampler, 8)
    for (s0, t0, h0), (s1, t1, h1) in zip(expected, got):
        assert s0 == s1 and h0 == h1 and torch.equal(t0, t1)
    assert sampler.cursor == reference.cursor == sum(sizes)

    # A restore moves the cursor back while a prefetch is pending: the next batch follows the restored cursor.
    sampler.load_state_dict(_state_at(prepared_data, 8))
    batch, _ = prefetcher.next_batch(sampler, 8)
    assert batch.start == 8
    assert torch.equal(batch.tokens, _sampler(prepared_data).samples(8 + 4, 4))


def _state_at(data_dir: Path, cursor: int) -> dict:
    sampler = _sampler(data_dir)
    sampler.next_batch(cursor)
    return sampler.state_dict()


def test_the_digest_is_left_out_on_ranks_that_write_no_log(prepared_data: Path):
    batch, digest = BatchPrefetcher(0, 1, pin=False, digest=False).next_batch(_sampler(prepared_data), 4)
    assert digest == "" and batch.tokens.shape == (4, 33)
