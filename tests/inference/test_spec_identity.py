"""With speculation on, greedy outputs stay token-identical to transformers' `generate` (and so to speculation
off): the suffix proposer on a transformers-written Llama directory, alone and in batches, through chunked prefill,
preemption and prefix-cache hits; tree drafts that always carry the true continuation as a later sibling; and the
command line and /metrics that expose it."""

from __future__ import annotations

import argparse

import pytest
from infer_helpers import ScriptedTreeProposer, one_thread
from test_engine_vs_transformers import MAX_NEW, _engine_greedy, _hf_greedy

from glassbox.errors import GlassboxError
from glassbox.inference.cli import register
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.metrics import ServerMetrics


@pytest.fixture(scope="module")
def reference(llama_dir, prompts):
    llm = LLM(llama_dir)
    # Repetitive prompts as well, whose continuations the suffix trees can draft.
    token_prompts = [llm.tokenizer.encode(p) for p in prompts[:10]]
    token_prompts += [p * 3 for p in token_prompts[:4]]
    with one_thread():
        return token_prompts, _hf_greedy(llama_dir, token_prompts)


def _suffix_engine(llama_dir, **cfg) -> LLMEngine:
    return LLMEngine.from_model_dir(llama_dir, EngineConfig(proposer="suffix", num_spec_tokens=8, **cfg))


def test_suffix_speculation_matches_transformers_in_a_batch_and_alone(llama_dir, reference):
    token_prompts, expected = reference
    eng = _suffix_engine(llama_dir)
    llm = LLM(engine=eng)
    assert _engine_greedy(llm, token_prompts) == expected
    # Run again, one at a time: the global tree now holds every output, so most of each is drafted.
    accepted = eng.spec.accepted_tokens
    for i in (0, 5, 11):
        assert _engine_greedy(llm, [token_prompts[i]]) == [expected[i]]
    assert eng.spec.accepted_tokens - accepted > MAX_NEW
    assert eng.blocks.num_used_blocks == 0
    stats = eng.stats()
    assert stats["spec_cached_requests"] == len(token_prompts) + 3 and stats["spec_tree_bytes"] > 0


def test_suffix_speculation_through_chunked_prefill_preemption_and_prefix_hits(llama_dir, reference):
    token_prompts, expected = reference
    # A 16-token budget chunks every long prompt beside running verifications (and cuts drafts to fit); 32 blocks
    # of 4 tokens cannot hold 14 sequences, so the scheduler preempts and recomputes.
    eng = _suffix_engine(llama_dir, block_size=4, num_kv_blocks=32, max_num_batched_tokens=16, max_model_len=128)
    llm = LLM(engine=eng)
    assert _engine_greedy(llm, token_prompts) == expected
    assert eng.scheduler.num_preemptions > 0 and eng.spec.accepted_tokens > 0
    hits = eng.blocks.prefix_hits
    assert _engine_greedy(llm, token_prompts[2:6]) == expected[2:6]
    assert eng.blocks.prefix_hits > hits and eng.blocks.num_used_blocks == 0


def test_tree_drafts_with_the_truth_as_a_later_sibling_match_transformers(llama_dir, reference):
    token_prompts, expected = reference
    proposer = ScriptedTreeProposer({tuple(p): e for p, e in zip(token_prompts, expected)}, vocab=512)
    eng = LLMEngine.from_model_dir(llama_dir, EngineConfig(num_spec_tokens=12, block_size=4, num_kv_blocks=40,
                                                           max_model_len=128), proposer=proposer)
    assert _engine_greedy(LLM(engine=eng), token_prompts) == expected
    assert eng.spec.accepted_tokens > 0.4 * sum(map(len, expected)) and eng.scheduler.num_preemptions > 0
    assert len(proposer.finished) == len(token_prompts)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_command_line_speculation_options_and_metrics(llama_dir, reference):
    from glassbox.inference.cli import _engine_config

    args = _parse(["generate", str(llama_dir), "--prompt", "x", "--speculative", "suffix", "--num-spec-tokens", "6",
                   "--spec-batch-tokens", "24", "--suffix-min-token-prob", "0.2", "--suffix-mode", "path"])
    cfg = _engine_config(args)
    assert (cfg.proposer, cfg.num_spec_tokens, cfg.spec_batch_tokens) == ("suffix", 6, 24)
    assert cfg.spec_options == {"min_token_prob": 0.2, "mode": "path"}
    assert _engine_config(_parse(["serve", str(llama_dir), "--speculative", "suffix"])).num_spec_tokens == 16
    with pytest.raises(GlassboxError, match="--speculative suffix"):
        _engine_config(_parse(["serve", str(llama_dir), "--suffix-max-depth", "8"]))
    for options, field in (({"max_depth": -1}, "max_depth"), ({"min_token_prob": 1.5}, "min_token_prob"),
                           ({"max_spec_factor": -2.0}, "max_spec_factor"), ({"depth": 3}, "depth")):
        with pytest.raises(GlassboxError, match=field):
            LLMEngine.from_model_dir(llama_dir, EngineConfig(proposer="suffix", num_spec_tokens=4,
                                                             spec_options=options))
    with pytest.raises(GlassboxError, match="num_spec_tokens"):
        EngineConfig(proposer="suffix")
    # The engine behind a server: its acceptance counters and the global tree's memory reach /metrics.
    eng = LLMEngine.from_model_dir(llama_dir, cfg)
    token_prompts, expected = reference
    assert _engine_greedy(LLM(engine=eng), token_prompts[10:12] * 2) == expected[10:12] * 2
    metrics = ServerMetrics()
    metrics.update_engine(eng.stats())
    text = metrics.render()
    for name in ("glassbox_spec_accepted_tokens_total", "glassbox_spec_draft_tokens_total",
                 "glassbox_spec_tree_bytes", "glassbox_spec_cached_requests"):
        assert name in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("glassbox_spec")}
    assert values["glassbox_spec_accepted_tokens_total"] == eng.spec.accepted_tokens > 0
    assert values["glassbox_spec_cached_requests"] == 4 and values["glassbox_spec_tree_bytes"] > 0


def test_abort_mid_speculation_frees_the_requests_tree_and_blocks(llama_dir, reference):
    from glassbox.inference.sampling_params import SamplingParams

    token_prompts, _ = reference
    eng = _suffix_engine(llama_dir)
    eng.add_request("a", token_prompts[11], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    while eng.spec.drafts == 0:
        eng.step()
    seq = eng.requests["a"].seqs[0]
    assert eng.proposer.cache.is_active(seq.seq_id) and eng.stats()["spec_active_requests"] == 1
    eng.abort("a")
    stats = eng.stats()
    assert not eng.proposer.cache.is_active(seq.seq_id) and stats["spec_active_requests"] == 0
    assert stats["spec_cached_requests"] == 0          # an aborted output does not join the global tree
    assert eng.blocks.num_used_blocks == 0
