"""Greedy outputs of the engine are token-identical to transformers' `generate` on the same model directory, alone
or in a batch, through chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from infer_helpers import needs_cxx_compiler, one_thread

from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams

MAX_NEW = 24


def _hf_greedy(model_dir, token_prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in token_prompts:
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False)
            out.append(gen[0, len(ids):].tolist())
    return out


def _engine_greedy(llm: LLM, token_prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(token_prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llama_reference(llama_dir, prompts):
    llm = LLM(llama_dir)
    token_prompts = [llm.tokenizer.encode(p) for p in prompts]
    with one_thread():
        return token_prompts, _hf_greedy(llama_dir, token_prompts)


def test_llama_batch_of_16_matches_transformers(llama_dir, llama_reference):
    token_prompts, expected = llama_reference
    assert len(token_prompts) == 16 and len({len(p) for p in token_prompts}) > 8
    assert len({tuple(e) for e in expected}) == 16
    got = _engine_greedy(LLM(llama_dir), token_prompts)
    assert got == expected


def test_separate_projections_match_transformers_too(llama_dir, llama_reference):
    # The engine joins Q/K/V and gate/up weights by default (EngineConfig.fuse_projections); the unjoined path too.
    token_prompts, expected = llama_reference
    llm = LLM(llama_dir, fuse_projections=False)
    assert llm.engine.model.layers[0].self_attn.qkv_weight is None
    assert _engine_greedy(llm, token_prompts[:6]) == expected[:6]
    assert LLM(llama_dir).engine.model.layers[0].self_attn.qkv_weight is not None


def test_llama_alone_matches_batch(llama_dir, llama_reference):
    token_prompts, expected = llama_reference
    llm = LLM(llama_dir)
    for i in (0, 2, 6):
        assert _engine_greedy(llm, [token_prompts[i]]) == [expected[i]]


def test_chunked_prefill_prefix_cache_and_preemption_keep_outputs(llama_dir, llama_reference):
    token_prompts, expected = llama_reference
    # 8-token budget: every prompt longer than 8 tokens is prefilled in chunks beside running decodes.
    # 24 blocks of 4 tokens: 16 sequences cannot all fit, so the scheduler must preempt and recompute.
    cfg = EngineConfig(block_size=4, num_kv_blocks=24, max_num_batched_tokens=8, max_model_len=80)
    llm = LLM(engine=LLMEngine.from_model_dir(llama_dir, cfg))
    assert _engine_greedy(llm, token_prompts) == expected
    eng = llm.engine
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.num_used_blocks == 0
    # Run again: the blocks of earlier prompts are still cached, and outputs stay identical.
    hits = eng.blocks.prefix_hits
    assert _engine_greedy(llm, token_prompts[:4]) == expected[:4]
    assert eng.blocks.prefix_hits > hits


def test_shared_prefix_reuses_blocks(llama_dir):
    cfg = EngineConfig(block_size=4, num_kv_blocks=64)
    llm = LLM(engine=LLMEngine.from_model_dir(llama_dir, cfg))
    base = list(range(10, 30))
    first = llm.generate([base + [5]], SamplingParams(temperature=0, max_tokens=4))[0]
    second = llm.generate([base + [6]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20
    fresh = LLM(engine=LLMEngine.from_model_dir(llama_dir, EngineConfig(enable_prefix_caching=False)))
    assert fresh.generate([base + [6]], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids == \
        second.outputs[0].token_ids


def test_mixtral_matches_transformers(mixtral_dir, prompts):
    llm = LLM(mixtral_dir)
    token_prompts = [llm.tokenizer.encode(p) for p in prompts[:8]]
    assert _engine_greedy(llm, token_prompts) == _hf_greedy(mixtral_dir, token_prompts)


def test_logprobs_match_transformers_logits(llama_dir, llama_reference):
    from transformers import AutoModelForCausalLM

    token_prompts, expected = llama_reference
    ids = token_prompts[1]
    out = LLM(llama_dir).generate([ids], SamplingParams(temperature=0, max_tokens=3, logprobs=4))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits[len(ids) - 1:len(ids) + 2], -1)
    for j, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[j]
        assert lp.logprob == pytest.approx(float(ref[j, lp.token_id]), abs=1e-4)
        top_ids = ref[j].topk(4).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids


@needs_cxx_compiler
def test_compiled_engine_matches_transformers_and_compiles_only_at_start(llama_dir, llama_reference):
    from torch._dynamo.utils import counters

    token_prompts, expected = llama_reference
    # Chunked prefill (16-token budget) and prefix hits: prompts alone and beside decodes, of one and many lengths.
    cfg = EngineConfig(block_size=4, num_kv_blocks=256, max_num_batched_tokens=16, max_model_len=80, compile=True)
    llm = LLM(engine=LLMEngine.from_model_dir(llama_dir, cfg))
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0 and not counters["graph_break"]          # each structure is one whole graph
    assert _engine_greedy(llm, token_prompts) == expected
    assert _engine_greedy(llm, token_prompts[3:9]) == expected[3:9]
    assert llm.engine.blocks.prefix_hits > 0
    # Staggered arrivals, as a server sees them: one new prompt at a time beside running decodes.
    eng = llm.engine
    for i, ids in enumerate(token_prompts[:6]):
        eng.add_request(f"staggered-{i}", ids, SamplingParams(temperature=0, max_tokens=MAX_NEW))
        eng.step()
        eng.step()
    finals = {}
    while eng.has_unfinished():
        finals.update({o.request_id: o for o in eng.step() if o.finished})
    assert [finals[f"staggered-{i}"].outputs[0].token_ids for i in range(6)] == expected[:6]
    assert counters["stats"]["unique_graphs"] == compiled      # the start-up run met every structure
    # Compiled code keeps no runner alive, not even in a reference cycle awaiting the garbage collector: a second
    # engine in the process gets the memory (on a GPU, the KV pool) of the first as soon as it is dropped.
    runner = weakref.ref(llm.engine.runner)
    gc.disable()
    try:
        del llm, eng
        assert runner() is None
    finally:
        gc.enable()
