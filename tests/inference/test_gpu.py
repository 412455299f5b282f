"""On a CUDA device: decode CUDA graphs, compiled or not, give the same greedy tokens as eager execution and as
transformers."""

from __future__ import annotations

import pytest
import torch

from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_graphs_match_eager_and_transformers(llama_dir, prompts):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0, max_tokens=24)
    outs = {}
    for mode in ("graphs", "compiled graphs", "eager"):
        cfg = EngineConfig(device="cuda", dtype="float32", cuda_graphs=mode != "eager",
                           compile=mode == "compiled graphs", max_num_seqs=20, num_kv_blocks=512)
        llm = LLM(engine=LLMEngine.from_model_dir(llama_dir, cfg))
        assert bool(llm.engine.runner.graphs) == (mode != "eager")
        token_prompts = [llm.tokenizer.encode(p) for p in prompts]
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(token_prompts, params)]
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in token_prompts[:3]]
        assert alone == outs[mode][:3], mode
    assert outs["graphs"] == outs["eager"]
    assert outs["compiled graphs"] == outs["eager"]
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    for ids, got in zip(token_prompts, outs["graphs"]):
        x = torch.tensor([ids], device="cuda")
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[0, len(ids):]
        assert got == ref.tolist()


def test_decode_graphs_compiled_for_a_dynamic_batch_give_the_per_size_tokens_from_fewer_compiles(llama_dir, prompts):
    """EngineConfig.graph_compile: one compile for a symbolic batch size (and batch 1) instead of one per captured
    size, the same greedy tokens (fp32, where the two compiles' rounding cannot flip a choice)."""
    import gc

    from torch._dynamo.utils import counters

    params = SamplingParams(temperature=0, max_tokens=16)
    tokens, compiles = {}, {}
    for mode in ("per_size", "dynamic"):
        torch._dynamo.reset()          # the other mode's compiled entries would serve this one's warm-ups
        before = counters["stats"]["unique_graphs"]
        cfg = EngineConfig(device="cuda", compile=True, compile_cache=False, piecewise_graphs=False, max_num_seqs=32,
                           graph_compile=mode)
        llm = LLM(engine=LLMEngine.from_model_dir(llama_dir, cfg))
        compiles[mode] = counters["stats"]["unique_graphs"] - before
        tokens[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert tokens["dynamic"] == tokens["per_size"]
    assert compiles["dynamic"] <= compiles["per_size"] - 3, compiles     # 6 decode sizes (1 .. 32) against ~2
