"""Tensor-parallel serving on real gloo process groups (CPU): sharded ranks give one process's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from glassbox.config import ConfigError
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.tensor_parallel import check_shardable, local_kv_heads, shard_model
from glassbox.models.transformer import ModelConfig, Transformer


def test_two_ranks_give_the_tokens_of_one(llama_dir, prompts):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    single = LLM(engine=LLMEngine.from_model_dir(llama_dir, EngineConfig(num_kv_blocks=128, max_num_seqs=4)))
    token_prompts = [single.tokenizer.encode(p) for p in prompts[:4]]
    token_prompts.append(token_prompts[0] * 3)            # a longer one, chunked beside decodes
    expected = [o.outputs[0].token_ids for o in single.generate(token_prompts, params)]

    cfg = EngineConfig(num_kv_blocks=128, max_num_seqs=4, max_num_batched_tokens=64, tensor_parallel_size=2)
    engine = LLMEngine.from_model_dir(llama_dir, cfg)
    try:
        assert engine.tp is not None and engine.tp.world == 2
        # Rank 0's cache holds its half of the KV heads; the pool is the size both ranks agreed on.
        assert local_kv_heads(engine.model) == engine.model.config.num_kv_heads // 2
        assert engine.runner.k_cache[0].shape[1] == engine.model.config.num_kv_heads // 2
        got = [o.outputs[0].token_ids for o in LLM(engine=engine).generate(token_prompts, params)]
        assert got == expected
        again = LLM(engine=engine).generate(token_prompts[:1], params)[0].outputs[0].token_ids   # prefix hit
        assert again == expected[0]
    finally:
        engine.close()
    assert all(not p.is_alive() for p in engine.runner._group.workers)


def test_shards_split_the_weights_and_bad_sizes_are_refused():
    cfg = ModelConfig(vocab_size=64, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=3,
                      intermediate_size=96, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    full_q = model.layers[0].self_attn.q_proj.weight.clone()
    shard_model(model, rank=1, world=3)
    attn = model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, full_q[2 * cfg.head_dim:4 * cfg.head_dim])
    assert attn.k_proj.weight.shape == (cfg.head_dim, 48) and model.layers[0].mlp.up_proj.weight.shape == (32, 48)
    with pytest.raises(ConfigError, match="cannot split the model's 3 KV heads"):
        check_shardable(Transformer(cfg), 2)
    moe = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                  intermediate_size=64, max_seq_len=32, num_experts=4))
    with pytest.raises(ConfigError, match="dense models"):
        check_shardable(moe, 2)
    with pytest.raises(ConfigError, match="compile"):
        EngineConfig(tensor_parallel_size=2, compile=True)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
