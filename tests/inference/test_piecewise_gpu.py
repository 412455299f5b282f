"""On a CUDA device: steps replayed as piecewise graphs (prompts, chunks, prefix hits, prompts beside decodes)
give the eager path's greedy tokens, on the dense and the varlen attention paths, with and without compile; the
graphs are captured at start (none during serving) and a compiled runner compiles nothing after its start."""

from __future__ import annotations

import pytest
import torch
from test_varlen_attention import _prompts, _serve
from test_varlen_gpu import _model

from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.models.transformer import ModelConfig, Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("attention", ["dense", "auto"])
@pytest.mark.parametrize("compile", [False, True])
def test_piecewise_graphs_equal_the_eager_path(attention, compile):
    from torch._dynamo.utils import counters

    # Compiled pieces fuse bf16 arithmetic differently from eager kernels, and a random model's near-ties then flip
    # (H200: the 9th token of one prompt); in fp32 (TF32 off) any difference is an error, not rounding.
    dtype = "float32" if compile else "bfloat16"
    model = _model() if not compile else _model().float()
    prompts = _prompts(200)
    outs = {}
    for pieces in (False, True):
        cfg = EngineConfig(device="cuda", dtype=dtype, block_size=4, num_kv_blocks=160,
                           max_num_batched_tokens=24, max_num_seqs=8, piecewise_graphs=pieces,
                           compile=compile and pieces)
        eng = LLMEngine(model, config=cfg)
        if attention == "dense":
            eng.runner = eng.runner.replaced(attention="dense")
        if pieces:
            assert sorted(eng.runner.piecewise.graphs) == [16, 24]
            assert all(len(g) == 3 for g in eng.runner.piecewise.graphs.values())   # L + 1 pieces
        compiled = counters["stats"]["unique_graphs"]
        outs[pieces] = _serve(eng, prompts, max_tokens=12)
        assert eng.blocks.prefix_hits > 0
        if pieces and compile:
            assert compiled > 0 and counters["stats"]["unique_graphs"] == compiled
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=0.1)


def test_swiftkv_layers_in_graphs_equal_the_eager_path():
    from glassbox.models.swiftkv import SwiftKVConfig, swiftkv_from_base

    torch.manual_seed(3)
    base = Transformer(ModelConfig(vocab_size=200, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                   intermediate_size=256, max_seq_len=128, init_std=0.1))
    model = swiftkv_from_base(base, SwiftKVConfig(2, 2)).cuda().to(torch.bfloat16).eval()
    prompts = _prompts(200, lens=(5, 22, 14, 31))
    outs = {}
    for pieces in (False, True):
        cfg = EngineConfig(device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=160,
                           max_num_batched_tokens=24, max_num_seqs=8, piecewise_graphs=pieces)
        eng = LLMEngine(model, config=cfg)
        if pieces:
            assert len(eng.runner.piecewise.graphs[24]) == 3                  # layers 0, 1 and their finish
            assert sorted(eng.runner.upper_pieces.graphs) == [1, 2, 4, 8]     # the sampling rows' sizes
            assert all(len(g) == 3 for g in eng.runner.upper_pieces.graphs.values())
        outs[pieces] = _serve(eng, prompts, max_tokens=12)
    assert [o.token_ids for o in outs[False]] == [o.token_ids for o in outs[True]]


def test_pieces_are_on_by_default_for_dense_models_only():
    cfg = dict(device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=160, max_num_batched_tokens=24)
    assert LLMEngine(_model(), config=EngineConfig(**cfg)).runner.piecewise is not None
    assert LLMEngine(_model(), config=EngineConfig(**cfg, cuda_graphs=False)).runner.piecewise is None
    moe = Transformer(ModelConfig(vocab_size=200, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=256, max_seq_len=128, num_experts=4)).cuda().to(torch.bfloat16)
    assert LLMEngine(moe.eval(), config=EngineConfig(**cfg)).runner.piecewise is None
