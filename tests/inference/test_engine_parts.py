"""The engine's parts on a random-init glassbox Transformer: blocks, scheduling, sampling, stopping, speculation."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import ScriptedProposer, tiny_transformer

from glassbox.errors import GlassboxError
from glassbox.inference.block_manager import BlockManager
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.policy import make_policy
from glassbox.inference.sampler import Sampler
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.scheduler import Scheduler
from glassbox.inference.sequence import Sequence
from glassbox.inference.speculative import EMPTY, PROPOSERS, NoProposer
from glassbox.inference.tokenizer import IncrementalDetokenizer, Tokenizer
from glassbox.models.transformer import Transformer

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_transformer()


def _reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (int(length),), generator=g).tolist()
            for length in torch.randint(1, 40, (n,), generator=g)]


def test_engine_matches_full_forward(model):
    prompts = _prompts(12) + [[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [7] * 6]     # equal lengths share one call
    llm = LLM(engine=LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=256)))
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [_reference_greedy(model, p, 12) for p in prompts]
    assert llm.engine.blocks.num_used_blocks == 0


def test_block_manager_shares_prefixes_by_chained_hash():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence("a", list(range(10)), GREEDY)
    assert bm.allocate(a, 10)
    a.verified([5])                                # all 10 computed, one token sampled
    bm.commit(a)                                   # two full blocks published
    b = Sequence("b", list(range(8)) + [99, 98, 97], GREEDY)
    hit = bm.match_prefix(b)
    assert hit == a.block_table[:2]
    assert bm.allocate(b, 3, hit) and b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    # The same tokens after a different prefix do not match: hashes chain over everything before.
    c = Sequence("c", [7, 7, 7, 7] + list(range(4, 8)) + [1], GREEDY)
    assert bm.match_prefix(c) == []
    # Only whole blocks below the last token can hit: the last token is always recomputed.
    d = Sequence("d", list(range(8)), GREEDY)
    assert bm.match_prefix(d) == a.block_table[:1]
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_used_blocks == 0
    # Freed blocks stay cached until handed out again.
    e = Sequence("e", list(range(9)), GREEDY)
    assert len(bm.match_prefix(e)) == 2
    big = Sequence("big", list(range(100, 132)), GREEDY)
    assert bm.allocate(big, 32)                    # takes every block, evicting the cached ones
    assert bm.match_prefix(e) == []
    assert not bm.allocate(Sequence("x", [1], GREEDY), 1)


def test_a_block_left_unpublished_behind_its_twin_is_published_once_the_twin_is_gone():
    # Two sequences compute the same first block in one step: the first commit publishes a's, b's twin stays
    # unpublished. Commits skip the blocks already published, but not b's, which takes over once a's is evicted.
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = (Sequence(n, list(range(5)), GREEDY) for n in "ab")
    for seq in (a, b):
        assert bm.allocate(seq, 5)
        seq.verified([9])
        bm.commit(seq)
    assert bm.blocks[a.block_table[0]].block_hash is not None
    assert bm.blocks[b.block_table[0]].block_hash is None
    bm.free_seq(a)
    assert bm.allocate(Sequence("big", list(range(50, 66)), GREEDY), 16)     # the free blocks, a's included
    assert bm.match_prefix(Sequence("c", list(range(5)), GREEDY)) == []
    b.verified([8, 7, 6])                           # 8 tokens computed: a second full block
    bm.commit(b)
    assert bm.match_prefix(Sequence("d", list(range(5)) + [9, 8, 7, 1], GREEDY)) == b.block_table[:2]


def test_scheduler_budget_chunks_and_preempts_latest():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, make_policy("fcfs"), max_num_seqs=8, max_num_batched_tokens=10)
    first = Sequence("first", list(range(12)), GREEDY, arrival_time=0.0)
    second = Sequence("second", list(range(20, 27)), GREEDY, arrival_time=1.0)
    sched.add(second)
    sched.add(first)
    out = sched.schedule()
    # FCFS: the earlier arrival first; the 10-token budget splits the 12-token prompt.
    assert [(s.seq.request_id, s.num_tokens, s.samples) for s in out.scheduled] == [("first", 10, False)]
    first.computed(10)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("first", 2), ("second", 7)]
    assert out.scheduled[0].samples and out.scheduled[1].samples
    first.verified([1, 2, 3, 4, 5])                # first now needs a 5th block, second holds 2
    second.verified([9])
    out = sched.schedule()
    assert out.preempted == [second] and second.num_computed_tokens == 0 and second.block_table == []
    assert [s.seq.request_id for s in out.scheduled] == ["first"]


def test_priority_policy_orders_waiting():
    policy = make_policy("priority")
    seqs = [Sequence(str(i), [1], GREEDY, arrival_time=float(i), priority=p) for i, p in enumerate([2, 0, 1])]
    assert [s.request_id for s in policy.rank(seqs)] == ["1", "2", "0"]
    with pytest.raises(GlassboxError, match="unknown scheduling policy"):
        make_policy("nope")


def test_sampler_filters_and_seeds():
    sampler = Sampler(seed=0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.1, -1.0]])
    top1 = Sequence("a", [1], SamplingParams(temperature=1.0, top_k=1))
    tiny_p = Sequence("b", [1], SamplingParams(temperature=1.0, top_p=0.01))
    for seq in (top1, tiny_p):
        assert all(sampler.sample(logits, [(seq, EMPTY)])[0].tokens == [0] for _ in range(20))
    # top-k 2 only ever draws the two best tokens.
    k2 = Sequence("c", [1], SamplingParams(temperature=1.0, top_k=2, seed=3))
    draws = {sampler.sample(logits, [(k2, EMPTY)])[0].tokens[0] for _ in range(50)}
    assert draws == {0, 1}
    # Frequencies follow softmax(logits / T).
    seq = Sequence("d", [1], SamplingParams(temperature=0.7, seed=11))
    counts = torch.zeros(5)
    for _ in range(3000):
        counts[sampler.sample(logits, [(seq, EMPTY)])[0].tokens[0]] += 1
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts / 3000, expected, atol=0.03)


def test_seeded_request_is_independent_of_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=10, n=2)
    alone = LLM(engine=LLMEngine(model)).generate([[5, 6, 7]], params)[0]
    crowd = LLM(engine=LLMEngine(model)).generate(_prompts(6) + [[5, 6, 7]],
                                                  [SamplingParams(temperature=1.0, max_tokens=10)] * 6 + [params])
    assert [o.token_ids for o in crowd[-1].outputs] == [o.token_ids for o in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids


def test_stop_tokens_max_tokens_and_ignore_eos(model):
    prompt = [3, 1, 4, 1, 5]
    ref = _reference_greedy(model, prompt, 12)
    eos = ref[4]
    eng = LLMEngine(model, eos_token_ids=[eos])
    out = LLM(engine=eng).generate([prompt], GREEDY)[0].outputs[0]
    assert out.token_ids == ref[:ref.index(eos) + 1] and out.finish_reason == "stop"
    out = LLM(engine=eng).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref and out.outputs[0].finish_reason == "length"
    out = LLM(engine=eng).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                            stop_token_ids=[ref[2]]))[0].outputs[0]
    assert out.token_ids == ref[:ref.index(ref[2]) + 1] and out.finish_reason == "stop"


def test_context_limit_finishes_with_length(model):
    eng = LLMEngine(model, config=EngineConfig(max_model_len=20))
    out = LLM(engine=eng).generate([list(range(15))], SamplingParams(temperature=0, max_tokens=None,
                                                                      ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, params, fragment", [
    ([], GREEDY, "empty"),
    (list(range(128)), GREEDY, "context"),
    ([1, 2], SamplingParams(max_tokens=200), "max_tokens"),
    ([1, 500], GREEDY, "vocabulary"),
    ([1, 2], SamplingParams(stop=["x"]), "stop strings need a tokenizer"),
])
def test_bad_requests_are_refused(model, prompt, params, fragment):
    with pytest.raises(GlassboxError, match=fragment):
        LLMEngine(model).add_request("r", prompt, params)


def test_bad_sampling_params():
    for kwargs in ({"n": 0}, {"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"stop": [""]}):
        with pytest.raises(GlassboxError, match="sampling"):
            SamplingParams(**kwargs)


def test_kv_pool_too_small_is_an_error(model):
    with pytest.raises(GlassboxError, match="cannot hold"):
        LLMEngine(model, config=EngineConfig(num_kv_blocks=2, block_size=16))


def test_compile_of_moe_is_an_error(mixtral_dir):
    # MoE routing reads expert counts on the host, which a compiled layer cannot do.
    with pytest.raises(GlassboxError, match="compile.*MoE"):
        LLMEngine.from_model_dir(mixtral_dir, EngineConfig(compile=True))


def test_abort_frees_blocks(model):
    eng = LLMEngine(model)
    eng.add_request("long", list(range(30)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.blocks.num_used_blocks > 0
    out = eng.abort("long")
    assert out.outputs[0].finish_reason == "abort" and eng.blocks.num_used_blocks == 0
    assert not eng.has_unfinished() and eng.step() == []


def test_speculative_drafts_are_verified_and_rolled_back(model):
    prompt = [9, 8, 7, 6, 5, 4, 3]
    ref = _reference_greedy(model, prompt, 30)
    proposer = ScriptedProposer(len(prompt), ref)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_spec_tokens=4), proposer=proposer)
    out = LLM(engine=eng).generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref
    assert proposer.calls > 0 and eng.num_steps < 20      # 30 tokens in well under 30 steps
    assert eng.blocks.num_used_blocks == 0
    # Sampling with drafts still completes and respects max_tokens exactly.
    sampled = LLM(engine=eng).generate([prompt], SamplingParams(temperature=0.8, seed=1, max_tokens=30,
                                                                ignore_eos=True))[0].outputs[0]
    assert len(sampled.token_ids) == 30
    assert PROPOSERS["none"] is NoProposer


def test_detokenizer_never_splits_characters(llama_dir):
    tok = Tokenizer(llama_dir)
    text = "déjà vu — 🙂 naïve 日本"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2                   # a small BPE: multi-byte characters span tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_continuous_batching_runs_requests_together(model):
    """16 requests of 10 tokens take 10 steps (one prefill step, then shared decode steps), not 160."""
    eng = LLMEngine(model)
    LLM(engine=eng).generate(_prompts(16), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert eng.num_steps == 10
    assert eng.blocks.num_used_blocks == 0
