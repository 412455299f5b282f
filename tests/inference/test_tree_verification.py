"""Token-tree verification on a random-init glassbox Transformer: one forward over a draft tree gives every node the
logits a plain forward over its branch gives (eager spans and the padded layout of the verification graphs
alike); verification keeps exactly the greedy path, or samples exactly the model's distribution; the accepted
path's KV ends up at its positions; drafts adapt to score and batch; an abort frees everything."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import ScriptedTreeProposer, tiny_transformer

from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampler import Sampler
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.scheduler import draft_cap
from glassbox.inference.sequence import Sequence
from glassbox.inference.speculative import EMPTY, Draft

VOCAB = 200
# A tree of 9 nodes over 4 depths: root children 0, 1, 5; node 1 has 2 and 4; 2 has 3; 5 has 6, 6 has 7 and 8.
TREE_PARENTS = (-1, -1, 1, 2, 1, -1, 5, 6, 6)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(VOCAB, max_seq_len=128)


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


def _decoding_engine(model, prompts: list[list[int]], **cfg) -> LLMEngine:
    """An engine whose sequences have prefilled their prompts and sampled one token each."""
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=128, **cfg))
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while any(s.num_output_tokens == 0 for s in eng.scheduler.waiting + eng.scheduler.running):
        eng.step()
    return eng


def _random_tree(g: torch.Generator, parents=TREE_PARENTS) -> Draft:
    return Draft(tuple(torch.randint(0, VOCAB, (len(parents),), generator=g).tolist()), parents)


def _check_tree_logits(model, eng: LLMEngine, drafts: dict[int, Draft], logits: torch.Tensor, batch) -> None:
    r = 0
    for s in batch.scheduled:
        seq, draft = s.seq, s.draft
        assert draft == drafts.get(seq.seq_id, EMPTY)
        torch.testing.assert_close(logits[r], _full_logits(model, seq.token_ids), atol=1e-4, rtol=1e-4)
        for i in range(len(draft)):
            branch = [draft.tokens[j] for j in draft.path(i)]
            torch.testing.assert_close(logits[r + 1 + i], _full_logits(model, seq.token_ids + branch),
                                       atol=1e-4, rtol=1e-4)
        r += 1 + len(draft)
    assert r == logits.shape[0]


@pytest.mark.parametrize("layout", ["eager", "padded"])
def test_tree_forward_equals_each_branch_forward(model, layout):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 9)]
    eng = _decoding_engine(model, prompts)
    if layout == "padded":
        eng.runner.enable_tree_group({4: 1 + len(TREE_PARENTS)}, eng.max_model_len)
    seqs = list(eng.scheduler.running)
    # Two sequences with trees (one of them linear), one plain decode in the same batch.
    drafts = {seqs[0].seq_id: _random_tree(g), seqs[2].seq_id: Draft.linear([3, 1, 4, 1])}
    for seq in seqs:
        seq.set_draft(drafts.get(seq.seq_id, EMPTY))
    batch = eng.scheduler.schedule()
    assert layout == "eager" or eng.runner.verification_shape(batch) == 4
    _check_tree_logits(model, eng, drafts, eng.runner.execute(batch, eng.blocks), batch)


def test_tree_forward_beside_a_prefill_chunk(model):
    """A verification step that also prefills a new prompt runs the tree as a masked span beside it."""
    g = torch.Generator().manual_seed(1)
    eng = _decoding_engine(model, [torch.randint(0, VOCAB, (11,), generator=g).tolist()])
    seq = eng.scheduler.running[0]
    eng.add_request("late", torch.randint(0, VOCAB, (7,), generator=g).tolist(),
                    SamplingParams(temperature=0, max_tokens=4))
    draft = _random_tree(g)
    seq.set_draft(draft)
    batch = eng.scheduler.schedule()
    assert [s.num_tokens for s in batch.scheduled] == [1 + len(draft), 7]
    logits = eng.runner.execute(batch, eng.blocks)
    first = type(batch)(batch.scheduled[:1])
    _check_tree_logits(model, eng, {seq.seq_id: draft}, logits[:1 + len(draft)], first)
    late = batch.scheduled[1].seq
    torch.testing.assert_close(logits[-1], _full_logits(model, late.token_ids), atol=1e-4, rtol=1e-4)


def test_greedy_verification_keeps_the_argmax_path_and_places_its_kv(model):
    """Accept a path whose nodes sit at tree slots 1 and 3 (depths 1 and 2): their KV must be moved to the
    positions after the last token, or the next step's logits would differ from a plain forward."""
    g = torch.Generator().manual_seed(2)
    eng = _decoding_engine(model, [torch.randint(0, VOCAB, (10,), generator=g).tolist()])
    seq = eng.scheduler.running[0]
    ids = list(seq.token_ids)
    t1 = int(_full_logits(model, ids).argmax())
    t2 = int(_full_logits(model, ids + [t1]).argmax())
    t3 = int(_full_logits(model, ids + [t1, t2]).argmax())
    wrong = [(t + 7) % VOCAB for t in (t1, t2)]
    # Root children: wrong, t1 (node 1); t1's children: wrong, t2 (node 3); t2 has no child: t3 is the bonus.
    seq.set_draft(Draft((wrong[0], t1, wrong[1], t2), (-1, -1, 1, 1)))
    eng.step()
    assert seq.token_ids == ids + [t1, t2, t3] and seq.num_computed_tokens == len(ids) + 2
    assert eng.spec.accepted_tokens == 2 and eng.spec.draft_tokens == 4
    eng.step()                          # a plain decode over the moved KV
    assert seq.token_ids[-1] == int(_full_logits(model, ids + [t1, t2, t3]).argmax())
    assert eng.blocks.num_used_blocks == eng.blocks.blocks_needed(seq.num_tokens)


def _plain_outputs(model, prompts, params, **cfg) -> list[list[int]]:
    llm = LLM(engine=LLMEngine(model, config=EngineConfig(block_size=4, **cfg)))
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_identity_with_trees_in_a_batch_with_preemption_and_prefix_hits(model, padded):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (10,),
                                                                                                generator=g)]
    prompts += [prompts[0][:], prompts[1] + [5]]         # prefix-cache hits on the second pass
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = _plain_outputs(model, prompts, params, num_kv_blocks=256)
    proposer = ScriptedTreeProposer({tuple(p): e for p, e in zip(prompts, expected)}, VOCAB)
    # 40 blocks of 4 tokens cannot hold 12 sequences of up to 50 tokens: the scheduler preempts.
    cfg = EngineConfig(block_size=4, num_kv_blocks=40, max_model_len=64, num_spec_tokens=8, spec_batch_tokens=96)
    eng = LLMEngine(model, config=cfg, proposer=proposer)
    if padded:
        eng.runner.enable_tree_group({b: 9 for b in (1, 2, 4, 8, 16)}, eng.max_model_len)
    got = [o.outputs[0].token_ids for o in LLM(engine=eng).generate(prompts, params)]
    assert got == expected
    assert eng.scheduler.num_preemptions > 0 and eng.blocks.prefix_hits > 0
    assert eng.spec.accepted_tokens > 0.3 * sum(map(len, expected))
    assert eng.blocks.num_used_blocks == 0 and len(proposer.finished) == len(prompts)


def test_penalties_and_logprobs_hold_under_tree_verification(model):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (9,), generator=g).tolist(), torch.randint(0, VOCAB, (4,), generator=g).tolist()]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=0.4,
                            frequency_penalty=1.5, repetition_penalty=1.3, logprobs=3)
    plain = LLM(engine=LLMEngine(model, config=EngineConfig(block_size=4))).generate(prompts, params)
    proposer = ScriptedTreeProposer({tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, plain)}, VOCAB)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_spec_tokens=9), proposer=proposer)
    spec = LLM(engine=eng).generate(prompts, params)
    assert eng.spec.accepted_tokens > 0
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_multi_candidate_rejection_emits_exactly_the_model_distribution():
    """At one node with three drafted children, the emitted token follows p exactly, and each child is accepted
    with its own probability."""
    from scipy.stats import chisquare

    sampler = Sampler(seed=0)
    p = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    draft = Draft((1, 4, 5), (-1, -1, -1))
    seq = Sequence("s", [0], SamplingParams(temperature=1.0, seed=5))
    n = 20000
    counts = torch.zeros(6)
    accepted = 0
    for _ in range(n):
        tok, child = sampler._verify_children(seq, draft, [0, 1, 2], p.clone())
        counts[tok] += 1
        accepted += child is not None
        assert child is None or draft.tokens[child] == tok
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    assert accepted / n == pytest.approx(0.3 + 0.2 + 0.1, abs=0.015)


class FixedTreeProposer:
    """The same two-level tree for every sequence, over a tiny vocabulary: siblings 1 and 2, children under both."""

    name = "fixed"

    def propose(self, seqs, max_tokens):
        return [Draft((1, 2, 0, 3, 1), (-1, -1, 0, 0, 1), score=5.0).truncated(max_tokens) for _ in seqs]

    def on_finished(self, seq):
        return None


def test_sampled_output_distribution_is_unchanged_by_speculation():
    """Chi-square over all 3-token outputs of a 4-token vocabulary: speculation on (tokens 2 and 3 come from
    verifying a two-level tree with siblings), against the model's exact joint distribution from plain forwards."""
    from scipy.stats import chisquare

    model = tiny_transformer(vocab_size=4, max_seq_len=16)
    prompt = [0, 3, 1]                                    # next-token probabilities about 0.2, 0.2, 0.08, 0.52

    def p(ids):
        return torch.softmax(_full_logits(model, prompt + ids), -1)

    exact = torch.zeros(4, 4, 4)
    for a in range(4):
        for b in range(4):
            exact[a, b] = p([])[a] * p([a])[b] * p([a, b])
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_spec_tokens=5, max_num_seqs=128, spec_batch_tokens=640),
                    proposer=FixedTreeProposer())
    n = 4000
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=i) for i in range(n)]
    counts = torch.zeros(4, 4, 4)
    for out in LLM(engine=eng).generate([prompt] * n, params):
        counts[tuple(out.outputs[0].token_ids)] += 1
    assert eng.spec.accepted_tokens > 0.1 * n
    expected, observed = exact.flatten() * n, counts.flatten()
    keep = expected >= 5                                  # chi-square needs expected counts of a few at least
    expected = expected[keep] / expected[keep].sum() * observed[keep].sum()
    assert chisquare(observed[keep].numpy(), expected.numpy()).pvalue > 1e-3


def test_drafts_adapt_to_score_and_batch(model):
    assert draft_cap(1, 16, 64) == 16 and draft_cap(8, 16, 64) == 8 and draft_cap(65, 16, 64) == 0
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (6,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = _plain_outputs(model, prompts, params)
    refs = {tuple(p): e for p, e in zip(prompts, expected)}
    # Scores below spec_min_score: nothing is verified.
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_spec_tokens=8, spec_min_score=9.0),
                    proposer=ScriptedTreeProposer(refs, VOCAB, score=8.0))
    assert [o.outputs[0].token_ids for o in LLM(engine=eng).generate(prompts, params)] == expected
    assert eng.spec.drafts == 0
    # Four decoding sequences and a step budget of 12 draft nodes: 3 nodes each, at most.
    proposer = ScriptedTreeProposer(refs, VOCAB)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_spec_tokens=8, spec_batch_tokens=12),
                    proposer=proposer)
    assert [o.outputs[0].token_ids for o in LLM(engine=eng).generate(prompts, params)] == expected
    assert 0 < eng.spec.drafts and eng.spec.draft_tokens <= 3 * eng.spec.drafts


def test_abort_mid_speculation_frees_blocks_and_tells_the_proposer(model):
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, VOCAB, (12,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = _plain_outputs(model, [prompt], params)[0]
    proposer = ScriptedTreeProposer({tuple(prompt): expected}, VOCAB)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_spec_tokens=8), proposer=proposer)
    eng.add_request("a", prompt, params)
    for _ in range(3):
        eng.step()
    seq = eng.requests["a"].seqs[0]
    eng._propose()                                           # the next step's draft, attached but not verified
    assert eng.spec.drafts > 0 and len(seq.draft) > 0
    out = eng.abort("a")
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == expected[:seq.num_output_tokens]
    assert eng.blocks.num_used_blocks == 0 and not seq.draft and seq.num_computed_tokens == 0
    assert proposer.finished == [seq]


def test_bad_speculation_settings_and_drafts_are_clear_errors(model):
    for kwargs, field in ((dict(spec_batch_tokens=0), "spec_batch_tokens"), (dict(spec_min_score=-1), "spec_min_score"),
                          (dict(spec_min_score=float("nan")), "spec_min_score"),
                          (dict(spec_options={"mode": "tree"}), "spec_options")):
        with pytest.raises(ConfigError, match=field):
            EngineConfig(**kwargs)
    with pytest.raises(GlassboxError, match="parent"):
        Draft((1, 2), (-1, 1))
    seq = Sequence("p", [1, 2, 3], SamplingParams())
    with pytest.raises(GlassboxError, match="decoding"):
        seq.set_draft(Draft.linear([4]))                  # nothing computed yet: a prompt, not a decode

    class Broken:
        name = "broken"

        def propose(self, seqs, max_tokens):
            return [[VOCAB + 5] for _ in seqs]

        def on_finished(self, seq):
            return None

    eng = LLMEngine(model, config=EngineConfig(num_spec_tokens=4), proposer=Broken())
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    eng.step()
    with pytest.raises(GlassboxError, match="not a Draft"):
        eng.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_verification_graphs_match_eager_on_cuda(llama_dir, prompts, compiled):
    """On CUDA, verification steps replay the captured tree graphs (and the KV move graph), giving the tokens of
    speculation off under the same compile setting, for the suffix proposer and for trees with the truth as a later
    sibling. (Compiled kernels round differently from eager ones, so a compiled run is held to a compiled
    baseline: the claim is that speculation changes nothing, not that inductor and eager agree on near-ties.)"""
    params = SamplingParams(temperature=0, max_tokens=24)
    base = LLM(engine=LLMEngine.from_model_dir(llama_dir, EngineConfig(device="cuda", compile=compiled)))
    token_prompts = [base.tokenizer.encode(p) for p in prompts]
    token_prompts += [p * 3 for p in token_prompts[:4]]
    expected = [o.outputs[0].token_ids for o in base.generate(token_prompts, params)]
    for proposer in ("suffix", "scripted"):
        cfg = EngineConfig(device="cuda", num_spec_tokens=8, max_num_seqs=4, num_kv_blocks=512, compile=compiled,
                           proposer="suffix" if proposer == "suffix" else "none")
        scripted = ScriptedTreeProposer({tuple(p): e for p, e in zip(token_prompts, expected)}, vocab=512)
        eng = LLMEngine.from_model_dir(llama_dir, cfg, proposer=scripted if proposer == "scripted" else None)
        assert eng.runner.tree_graphs and eng.runner._move is not None
        replays = []
        run = eng.runner.run_tree_group
        eng.runner.run_tree_group = lambda batch, blocks: replays.append(len(batch.scheduled)) or run(batch, blocks)
        llm = LLM(engine=eng)
        assert [o.outputs[0].token_ids for o in llm.generate(token_prompts, params)] == expected, proposer
        assert [llm.generate([p], params)[0].outputs[0].token_ids for p in token_prompts[:3]] == expected[:3]
        assert replays and eng.spec.accepted_tokens > 0, proposer
