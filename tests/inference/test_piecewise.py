"""Piecewise graphs (glassbox.inference.piecewise) on a CPU, where the pieces run uncaptured on the same padded
buffers the graphs use: the cut at attention and the padding give the eager path's greedy tokens and logprobs
through mixed lengths, chunked prefill, prefix hits, prompts beside decodes and draft trees, on the dense and the
varlen attention paths; steps past the largest size fall back to the eager path; models the pieces cannot hold
are refused with a reason. Captured graphs on CUDA: tests/inference/test_piecewise_gpu.py."""

from __future__ import annotations


import pytest
import torch
from infer_helpers import ScriptedTreeProposer, needs_cxx_compiler, tiny_transformer
from test_varlen_attention import _assert_same, _engine, _prompts, _serve, _tree_draft_setup

from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.model_runner import decoder_layer
from glassbox.inference.piecewise import PiecewiseGraphs, piecewise_sizes
from glassbox.models.swiftkv import SwiftKVConfig, swiftkv_from_base
from glassbox.models.transformer import ModelConfig, Transformer


def test_sizes_double_up_to_the_step_budget():
    assert piecewise_sizes(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert piecewise_sizes(24) == [16, 24]
    assert piecewise_sizes(8) == [8]


def _model() -> Transformer:
    """The tiny model with norm weights away from 1, so that a piece applying the wrong norm shows."""
    model = tiny_transformer()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


class _CountingRuns:
    """Counts the steps that went through the pieces, and the largest."""

    def __init__(self, pieces: PiecewiseGraphs):
        self.pieces, self.steps, self.largest = pieces, 0, 0
        self._run = pieces.run
        pieces.run = self

    def __call__(self, ids, positions, attention):
        self.steps += 1
        self.largest = max(self.largest, ids.numel())
        return self._run(ids, positions, attention)


@pytest.mark.parametrize("attention", ["dense", "reference"])
def test_pieces_equal_the_eager_path(attention):
    model = _model()
    prompts = _prompts(200)
    eager = _serve(_engine(model, attention), prompts)
    eng = _engine(model, attention, piecewise_graphs=True)
    assert eng.runner.piecewise.sizes == [16, 24] and not eng.runner.piecewise.graphs
    runs = _CountingRuns(eng.runner.piecewise)
    _assert_same(eager, _serve(eng, prompts))
    # Every step ran in pieces (the budget is the largest size), padded from odd sizes; prefix hits were met.
    assert runs.steps == eng.num_steps and runs.largest == 24 and eng.blocks.prefix_hits > 0


def test_draft_trees_run_in_pieces():
    model = _model()
    prompts, plain, refs = _tree_draft_setup(model)
    outs = {}
    for pieces in (False, True):
        eng = _engine(model, "reference", proposer=ScriptedTreeProposer(refs, vocab=200), num_spec_tokens=6,
                      piecewise_graphs=pieces)
        outs[pieces] = _serve(eng, prompts, max_tokens=12)
        assert eng.spec.accepted_tokens > 0
    _assert_same(outs[False], outs[True])
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in plain]


@pytest.mark.parametrize("group", [1, 2])
def test_swiftkv_layers_run_in_pieces(group):
    """Layers < l in pieces over every row, the bulk KV write, then layers >= l in pieces of their own over the
    sampling rows (queries only)."""
    torch.manual_seed(3)
    base = Transformer(ModelConfig(vocab_size=200, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128, max_seq_len=128, init_std=0.1)).eval()
    model = swiftkv_from_base(base, SwiftKVConfig(2, group)).eval()
    prompts = _prompts(200, lens=(5, 22, 14, 31))
    eager = _serve(_engine(model, "reference"), prompts)
    eng = _engine(model, "reference", piecewise_graphs=True)
    assert (eng.runner.piecewise.first, eng.runner.piecewise.stop) == (0, 2)
    assert (eng.runner.upper_pieces.first, eng.runner.upper_pieces.stop) == (2, 4)
    runs = _CountingRuns(eng.runner.piecewise)
    upper = eng.runner.upper_pieces
    upper_runs, run_hidden = [0], upper.run_hidden
    upper.run_hidden = lambda *a: upper_runs.__setitem__(0, upper_runs[0] + 1) or run_hidden(*a)
    _assert_same(eager, _serve(eng, prompts))
    assert runs.steps == eng.num_steps and upper_runs[0] > 0


def test_steps_past_the_largest_size_run_eagerly():
    model = tiny_transformer()
    prompts = _prompts(200, lens=(40, 33, 26))
    eager = _serve(_engine(model, "dense", max_num_batched_tokens=64), prompts)
    eng = _engine(model, "dense", max_num_batched_tokens=64)
    eng.runner = eng.runner.replaced(piecewise=[16])      # pure decodes fit; the 64-token prompt steps do not
    runs = _CountingRuns(eng.runner.piecewise)
    _assert_same(eager, _serve(eng, prompts))
    assert 0 < runs.steps < eng.num_steps and runs.largest <= 16


def test_by_default_pieces_run_only_where_they_are_captured():
    """None (the default) means on with CUDA graphs, dense, one rank: on a CPU the eager path runs."""
    assert EngineConfig().piecewise_graphs is None
    assert LLMEngine(tiny_transformer(), config=EngineConfig(num_kv_blocks=64)).runner.piecewise is None


def test_models_the_pieces_cannot_hold_are_refused():
    moe = Transformer(ModelConfig(vocab_size=200, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=128, max_seq_len=128, num_experts=4, experts_per_token=2)).eval()
    with pytest.raises(GlassboxError, match="MoE"):
        LLMEngine(moe, config=EngineConfig(num_kv_blocks=64, piecewise_graphs=True))
    with pytest.raises(ConfigError, match="piecewise_graphs"):
        EngineConfig(tensor_parallel_size=2, piecewise_graphs=True)
    with pytest.raises(ConfigError, match="piecewise_graphs"):
        EngineConfig(piecewise_graphs="yes")
    with pytest.raises(GlassboxError, match=">= 1"):
        PiecewiseGraphs(tiny_transformer(), [0], capture=False)
    with pytest.raises(GlassboxError, match="range"):
        PiecewiseGraphs(tiny_transformer(), [4], capture=False, layers=(1, 1))


@needs_cxx_compiler
def test_compiled_pieces_compile_at_start_only_and_the_eager_structures_not_at_all():
    from torch._dynamo.utils import counters

    model = _model()
    prompts = _prompts(200)
    eager = _serve(_engine(model, "reference"), prompts)
    before = counters["stats"]["unique_graphs"]
    eng = _engine(model, "reference", piecewise_graphs=True, compile=True)
    compiled = counters["stats"]["unique_graphs"]
    # The embedding piece and the layer piece, with and without a next layer (about three compiles, each at
    # dynamic sizes), where the eager path alone compiles about nine structures; no graph breaks.
    assert 0 < compiled - before <= 4 and not counters["graph_break"]
    assert eng.runner._eager_block is decoder_layer            # the fallback stays uncompiled
    _assert_same(eager, _serve(eng, prompts))
    assert counters["stats"]["unique_graphs"] == compiled     # serving compiled nothing new
