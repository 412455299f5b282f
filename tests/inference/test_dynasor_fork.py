"""Forking a probe off a running sequence: it shares the parent's full KV blocks by reference, copies only the
partly filled last block, computes only its own new tokens, decodes what a fresh request would, and frees it all."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_transformer

from glassbox.errors import GlassboxError
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.transformer import Transformer

BLOCK = 4
CUE = [7, 8, 9]
GREEDY = SamplingParams(temperature=0, max_tokens=30)
PROBE = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_transformer()


def _engine(model: Transformer, **kw) -> LLMEngine:
    return LLMEngine(model, config=EngineConfig(block_size=BLOCK, num_kv_blocks=64, **kw))


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_probe_shares_full_blocks_copies_the_tail_and_frees_everything(model):
    engine = _engine(model)
    prompt = list(range(10, 23))                        # 13 tokens: 3 full blocks and a partial one
    engine.add_request("main", prompt, GREEDY)
    for _ in range(3):                                  # the prefill, then 2 decodes: 16 tokens, 15 computed
        engine.step()
    parent = engine.requests["main"].seqs[0]
    computed = parent.num_computed_tokens
    assert computed == parent.num_tokens - 1 == 15
    assert engine.fork("main", "probe", CUE, PROBE)
    child = engine.requests["probe"].seqs[0]
    full = computed // BLOCK
    assert child.block_table[:full] == parent.block_table[:full]            # shared by reference
    assert all(engine.blocks.blocks[b].ref_count == 2 for b in parent.block_table[:full])
    assert child.block_table[full] != parent.block_table[full]              # its own copy of the partial block
    runner = engine.runner
    for pos in range(full * BLOCK, computed):
        src, dst = engine.blocks.slot(parent, pos), engine.blocks.slot(child, pos)
        for kc, vc in zip(runner.k_cache, runner.v_cache):
            assert torch.equal(kc[src], kc[dst]) and torch.equal(vc[src], vc[dst])
    assert child.num_computed_tokens == computed                            # nothing of the context recomputed
    assert engine.blocks.fork_shared_blocks == full and engine.blocks.fork_copied_tokens == computed % BLOCK

    rows: list[list[tuple[str, int]]] = []
    execute = runner.execute

    def recording(batch, blocks):
        rows.append([(s.seq.request_id, s.num_tokens) for s in batch.scheduled])
        return execute(batch, blocks)

    runner.execute = recording
    engine.step()
    assert ("probe", 1 + len(CUE)) in rows[0]          # the parent's last sampled token and the cue, no more
    _run(engine)
    assert engine.blocks.num_used_blocks == 0


def test_forked_probe_decodes_what_a_fresh_request_would(model):
    engine = _engine(model)
    prompt = list(range(30, 41))
    engine.add_request("main", prompt, GREEDY)
    for _ in range(6):
        engine.step()
    parent = engine.requests["main"].seqs[0]
    context = list(parent.token_ids)
    assert engine.fork("main", "probe", CUE, PROBE)
    done = _run(engine)
    assert engine.blocks.num_used_blocks == 0                               # parent and probe freed it all
    assert engine.stats()["num_forks"] == 1

    fresh = _engine(model, enable_prefix_caching=False)
    fresh.add_request("probe", context + CUE, PROBE)
    fresh.add_request("main", prompt, GREEDY)
    want = _run(fresh)
    assert done["probe"] == want["probe"]
    assert done["main"] == want["main"]                                     # the parent is unaffected


def test_probe_outlives_its_parent_and_frees_on_abort(model):
    engine = _engine(model)
    engine.add_request("main", list(range(50, 63)), GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.fork("main", "probe", CUE, PROBE)
    engine.abort("main")                                # the parent stops; the probe still holds the shared KV
    child = engine.requests["probe"].seqs[0]
    assert all(engine.blocks.blocks[b].ref_count == 1 for b in child.block_table)
    engine.step()
    engine.abort("probe")
    assert engine.blocks.num_used_blocks == 0


def test_fork_refuses_what_it_cannot_share(model):
    engine = _engine(model)
    engine.add_request("main", list(range(5, 12)), GREEDY)
    assert not engine.fork("main", "probe", CUE, PROBE)                      # still waiting: no KV to share
    with pytest.raises(GlassboxError, match="no sample"):
        engine.fork("nobody", "probe", CUE, PROBE)
    engine.step()
    with pytest.raises(GlassboxError, match="already in use"):
        engine.fork("main", "main", CUE, PROBE)
    assert "probe" not in engine.requests
