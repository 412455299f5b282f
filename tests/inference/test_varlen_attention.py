"""The varlen layout of eager steps (glassbox.inference.attention) on a CPU: the plain-torch kernel is bottom-right
causal per sequence, the packed key slots are the block manager's, the start-up check rejects a kernel aligned
the other way, and an engine whose runner packs its steps gives the dense path's greedy tokens and logprobs
(fp32 tolerance) through mixed lengths, chunked prefill, prefix hits, prompts beside decodes, draft trees beside
prompts, grouped and full K/V heads, and SwiftKV's upper layers with AcrossKV."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from infer_helpers import ScriptedTreeProposer, needs_cxx_compiler, tiny_transformer

from glassbox.errors import GlassboxError
from glassbox.inference.attention import choose_kernel, pack, probe, reference_varlen
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.swiftkv import SwiftKVConfig, swiftkv_from_base
from glassbox.models.transformer import ModelConfig, Transformer

CPU = torch.device("cpu")


def _per_sequence(q, k, v, qs, ks):
    """Each sequence on its own, its K/V heads repeated, an explicit bottom-right causal mask."""
    out, qa, ka = [], 0, 0
    for nq, nk in zip(qs, ks):
        rep = q.shape[1] // k.shape[1]
        qi = q[qa:qa + nq].transpose(0, 1)
        ki = k[ka:ka + nk].repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[ka:ka + nk].repeat_interleave(rep, 1).transpose(0, 1)
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
        qa, ka = qa + nq, ka + nk
    return torch.cat(out)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_kernel_is_causal_from_the_bottom_right(kv_heads):
    gen = torch.Generator().manual_seed(kv_heads)
    qs, ks = [6, 1, 4, 3], [6, 9, 13, 3]           # fresh, decode, chunked continuation, fresh
    q = torch.randn(sum(qs), 4, 8, generator=gen)
    k, v = (torch.randn(sum(ks), kv_heads, 8, generator=gen) for _ in range(2))
    got = reference_varlen(q, k, v, _cu(qs), _cu(ks), max(qs), max(ks))
    torch.testing.assert_close(got, _per_sequence(q, k, v, qs, ks), atol=1e-6, rtol=1e-5)


def test_pack_gathers_each_sequence_from_its_blocks():
    bs = 4
    tables = [[7, 2], [5], [9, 3, 1]]
    rows, ns, starts = [0, 3, 4], [3, 1, 5], [2, 0, 6]     # a prefix hit, a one-token prompt, a continuation
    batch = pack(rows, ns, starts, tables, every_row=False, block_size=bs, device=CPU, kernel=reference_varlen)
    want = [t[p // bs] * bs + p % bs for t, n, s in zip(tables, ns, starts) for p in range(s + n)]
    assert batch.key_slots.tolist() == want
    assert batch.cu_q.tolist() == [0, 3, 4, 9] and batch.cu_k.tolist() == [0, 5, 6, 17]
    assert batch.rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] and (batch.max_q, batch.max_k) == (5, 11)
    assert pack(rows, ns, starts, tables, True, bs, CPU, reference_varlen).rows is None


def _top_left(q, k, v, cu_q, cu_k, max_q, max_k):
    """A kernel with the other causal alignment (SDPA's is_causal with fewer queries than keys)."""
    out = []
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
                                           is_causal=True, enable_gqa=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def test_kernel_choice_is_made_once_and_checked():
    assert choose_kernel("auto", CPU, torch.float32, 4, 2, 16) is None          # CPU: the dense path
    assert choose_kernel("dense", CPU, torch.float32, 4, 2, 16) is None
    assert choose_kernel("reference", CPU, torch.float32, 4, 2, 16) is reference_varlen
    with pytest.raises(GlassboxError, match="flash kernel"):
        choose_kernel("varlen", CPU, torch.bfloat16, 4, 2, 16)
    with pytest.raises(GlassboxError, match="expected one of"):
        choose_kernel("flex", CPU, torch.float32, 4, 2, 16)
    assert probe(reference_varlen, CPU, torch.float32, 4, 2, 16) is None
    assert "differs from the reference" in probe(_top_left, CPU, torch.float32, 4, 2, 16)


class _Counting:
    """The reference kernel, counting the calls of the steps that used it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return reference_varlen(*args)


def _engine(model, attention_mode, proposer=None, **cfg):
    eng = LLMEngine(model, config=EngineConfig(**{"block_size": 4, "num_kv_blocks": 160,
                                                  "max_num_batched_tokens": 24, "max_num_seqs": 8, **cfg}),
                    proposer=proposer)
    eng.runner = eng.runner.replaced(attention=attention_mode)
    if attention_mode == "reference":
        eng.runner.varlen = _Counting()
    return eng


def _prompts(vocab, lens=(5, 17, 33, 9, 40, 3, 26)):
    prompts = [[(7 * j + 3 * i) % (vocab - 5) + 5 for j in range(n)] for i, n in enumerate(lens)]
    return prompts + [prompts[1][:12] + [3, 4, 5, 6, 7]]       # the first 3 blocks of prompt 1: a prefix hit


def _serve(eng, prompts, max_tokens=8):
    """Half the prompts at once (mixed lengths, chunked at 24 tokens a step), the rest one per step beside the
    running decodes; outputs by request."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, ignore_eos=True)
    half = len(prompts) // 2
    for i, p in enumerate(prompts[:half]):
        eng.add_request(str(i), p, params)
    outs, later = {}, list(enumerate(prompts))[half:]
    while eng.has_unfinished() or later:
        if later:
            i, p = later.pop(0)
            eng.add_request(str(i), p, params)
        outs.update({o.request_id: o.outputs[0] for o in eng.step() if o.finished})
    return [outs[str(i)] for i in range(len(prompts))]


def _assert_same(dense, packed):
    for a, b in zip(dense, packed):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_packed_steps_equal_the_dense_path(kv_heads):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=200, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                                    intermediate_size=128, max_seq_len=128, init_std=0.1)).eval()
    prompts = _prompts(200)
    dense = _serve(_engine(model, "dense"), prompts)
    eng = _engine(model, "reference")
    packed = _serve(eng, prompts)
    _assert_same(dense, packed)
    assert eng.blocks.prefix_hits > 0 and eng.runner.varlen.calls > 0


def _tree_draft_setup(model):
    """Prompts, their plain greedy outputs on the dense path (12 tokens), and those outputs keyed by prompt: the
    references a ScriptedTreeProposer drafts token trees from."""
    prompts = _prompts(200, lens=(6, 19, 11, 30))
    plain = _serve(_engine(model, "dense"), prompts, max_tokens=12)
    return prompts, plain, {tuple(p): o.token_ids for p, o in zip(prompts, plain)}


def test_draft_trees_beside_prompts_keep_the_dense_mask():
    model = tiny_transformer()
    prompts, plain, refs = _tree_draft_setup(model)
    outs = {}
    for mode in ("dense", "reference"):
        proposer = ScriptedTreeProposer(refs, vocab=200)
        eng = _engine(model, mode, proposer=proposer, num_spec_tokens=6)
        outs[mode] = _serve(eng, prompts, max_tokens=12)
        assert eng.spec.accepted_tokens > 0
        assert mode == "dense" or eng.runner.varlen.calls > 0
    _assert_same(outs["dense"], outs["reference"])
    assert [o.token_ids for o in outs["reference"]] == [o.token_ids for o in plain]


@pytest.mark.parametrize("group", [1, 2])
def test_swiftkv_upper_layers_and_acrosskv_equal_the_dense_path(group):
    torch.manual_seed(3)
    base = Transformer(ModelConfig(vocab_size=200, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128, max_seq_len=128, init_std=0.1)).eval()
    model = swiftkv_from_base(base, SwiftKVConfig(2, group)).eval()
    prompts = _prompts(200, lens=(5, 22, 14, 31))
    dense = _serve(_engine(model, "dense"), prompts)
    eng = _engine(model, "reference")
    _assert_same(dense, _serve(eng, prompts))
    assert eng.runner.varlen.calls > 0


@needs_cxx_compiler
def test_compiled_packed_steps_compile_only_at_start():
    from torch._dynamo.utils import counters

    model = tiny_transformer()
    prompts = _prompts(200)
    dense = _serve(_engine(model, "dense"), prompts)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=160, max_num_batched_tokens=24,
                                               max_num_seqs=8))
    before = counters["stats"]["unique_graphs"]
    eng.runner = eng.runner.replaced(attention="reference", compile=True)
    compiled = counters["stats"]["unique_graphs"]
    # Packed steps and pure decodes: two structures where the dense path compiles about nine.
    assert 0 < compiled - before <= 3 and not counters["graph_break"]
    _assert_same(dense, _serve(eng, prompts))
    assert counters["stats"]["unique_graphs"] == compiled          # the start-up warm-up met every structure
