"""On a CUDA device: torch's varlen flash kernel, as the runner calls it, is the reference kernel's bottom-right
causal attention with grouped heads; `auto` picks it; and mixed steps (mixed lengths, chunked prefill, prefix hits,
prompts beside decodes replayed from graphs) give the dense eager path's greedy tokens, eager and compiled, the
compiled runner compiling only at start."""

from __future__ import annotations

import pytest
import torch
from test_varlen_attention import _cu, _prompts, _serve

from glassbox.inference.attention import choose_kernel, flash_varlen, reference_varlen
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.models.transformer import ModelConfig, Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 4, 64), (8, 8, 128), (32, 8, 128)])
def test_flash_kernel_is_the_reference(dtype, heads, kv_heads, head_dim):
    kernel, why = flash_varlen()
    assert kernel is not None, why
    gen = torch.Generator().manual_seed(heads)
    qs, ks = [300, 1, 1, 77, 5, 129], [300, 513, 40, 1100, 5, 129]   # fresh, decodes, chunks, fresh
    q = torch.randn(sum(qs), heads, head_dim, generator=gen).cuda()
    k, v = (torch.randn(sum(ks), kv_heads, head_dim, generator=gen).cuda() for _ in range(2))
    cu_q, cu_k = _cu(qs).cuda(), _cu(ks).cuda()
    got = kernel(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, max(qs), max(ks)).float()
    want = reference_varlen(q, k, v, cu_q, cu_k, max(qs), max(ks))
    assert float((got - want).abs().max()) < (5e-2 if dtype == torch.bfloat16 else 1e-2)
    assert choose_kernel("auto", CUDA, dtype, heads, kv_heads, head_dim) is not None


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=200, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, max_seq_len=128, init_std=0.1)
    return Transformer(cfg).cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("compile", [False, True])
def test_mixed_steps_equal_the_dense_eager_path(compile):
    from torch._dynamo.utils import counters

    model = _model()
    prompts = _prompts(200)
    outs = {}
    for mode in ("dense", "auto"):
        # Graphs for the decodes with the eager layer; the compiled variant compiles only the eager structures.
        cfg = EngineConfig(device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=160,
                           max_num_batched_tokens=24, max_num_seqs=8, cuda_graphs=not compile,
                           compile=compile and mode == "auto")
        eng = LLMEngine(model, config=cfg)
        if mode == "dense":
            eng.runner = eng.runner.replaced(attention="dense")
        assert (eng.runner.varlen is None) == (mode == "dense")
        compiled = counters["stats"]["unique_graphs"]
        outs[mode] = _serve(eng, prompts, max_tokens=12)
        assert eng.blocks.prefix_hits > 0
        if compile and mode == "auto":
            assert compiled > 0 and not counters["graph_break"]
            assert counters["stats"]["unique_graphs"] == compiled     # start-up met every structure
    for a, b in zip(outs["dense"], outs["auto"]):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=0.1)
