"""The engine's SwiftKV path: greedy outputs equal the same SwiftKV model's full forward in transformers (the
directory's own model class), alone and in batches, through chunked prefill, prefix-cache hits, preemption and
speculative drafts (linear and tree); AcrossKV layers share one cache, so the same bytes hold more tokens."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import ScriptedProposer, ScriptedTreeProposer, one_thread

import glassbox  # noqa: F401  (registers the SwiftKV model type with transformers)
from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.checkpoints.hf_swiftkv import save_swiftkv_model_dir
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.model_runner import kv_bytes_per_block
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.swiftkv import SwiftKVConfig, swiftkv_from_base

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def _deep_llama(out, tokenizer_json):
    """A 4-layer random Llama written by transformers (room for l = 2 and a group of 2 above it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(77)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.08, tie_word_embeddings=False)).save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return out


def _swiftkv_dir(base_dir, out, layer, group):
    """The transform with its new tensors perturbed (as distillation would move them), so that the upper layers'
    queries and KV really come from the new projections."""
    base, _ = load_hf_model_dir(base_dir)
    model = swiftkv_from_base(base, SwiftKVConfig(layer, group))
    gen = torch.Generator().manual_seed(layer * 10 + group)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("swiftkv_"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    return save_swiftkv_model_dir(model, out, base_dir)


def _hf_greedy(model_dir, prompts):
    """Greedy continuation by the full forward of transformers' model class for the directory, every step."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad(), one_thread():
        for ids in prompts:
            seq = list(ids)
            for _ in range(MAX_NEW):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(ids):])
    return outs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("swiftkv")
    base = _deep_llama(root / "base", tokenizer_json)
    return {"base": base, "single": _swiftkv_dir(base, root / "single", 2, 1),
            "across": _swiftkv_dir(base, root / "across", 2, 2)}


@pytest.fixture(scope="module")
def reference(dirs, prompts):
    llm = LLM(dirs["single"])
    token_prompts = [llm.tokenizer.encode(p) for p in prompts[:10]]
    return token_prompts, {name: _hf_greedy(dirs[name], token_prompts) for name in ("single", "across")}


def _greedy(engine, prompts):
    return [o.outputs[0].token_ids for o in LLM(engine=engine).generate(prompts, GREEDY)]


@pytest.mark.parametrize("name", ["single", "across"])
def test_engine_matches_transformers_alone_and_in_batches(dirs, reference, name):
    token_prompts, expected = reference
    assert len({tuple(e) for e in expected[name]}) > 5
    eng = LLMEngine.from_model_dir(dirs[name], EngineConfig(block_size=4))
    assert _greedy(eng, token_prompts) == expected[name]
    assert _greedy(eng, [token_prompts[3]]) == [expected[name][3]]
    # The base model's outputs differ: the engine really ran the transformed upper layers.
    base = LLMEngine.from_model_dir(dirs["base"], EngineConfig(block_size=4))
    assert _greedy(base, token_prompts) != expected[name]


@pytest.mark.parametrize("name", ["single", "across"])
def test_chunked_prefill_prefix_hits_and_preemption(dirs, reference, name):
    token_prompts, expected = reference
    cfg = EngineConfig(block_size=4, num_kv_blocks=20, max_num_batched_tokens=8, max_model_len=64)
    eng = LLMEngine.from_model_dir(dirs[name], cfg)
    assert _greedy(eng, token_prompts) == expected[name]
    assert eng.scheduler.num_preemptions > 0 and eng.blocks.num_used_blocks == 0
    hits = eng.blocks.prefix_hits
    assert _greedy(eng, token_prompts[:4]) == expected[name][:4]
    assert eng.blocks.prefix_hits > hits


def test_speculative_linear_and_tree_drafts(dirs, reference):
    token_prompts, expected = reference
    ref = expected["across"]
    prompt = token_prompts[0]
    proposer = ScriptedProposer(len(prompt), ref[0])
    eng = LLMEngine.from_model_dir(dirs["across"], EngineConfig(block_size=4, num_spec_tokens=4), proposer=proposer)
    assert _greedy(eng, [prompt]) == [ref[0]]
    assert eng.spec.accepted_tokens > 0
    tree = ScriptedTreeProposer({tuple(p): e for p, e in zip(token_prompts, ref)}, vocab=512)
    eng = LLMEngine.from_model_dir(dirs["across"], EngineConfig(num_spec_tokens=8, block_size=4, num_kv_blocks=30,
                                                                max_model_len=64), proposer=tree)
    assert _greedy(eng, token_prompts) == ref
    assert eng.spec.accepted_tokens > 0


def test_across_kv_layers_share_one_cache(dirs):
    single = LLMEngine.from_model_dir(dirs["single"], EngineConfig(block_size=4, num_kv_blocks=8, max_model_len=32))
    across = LLMEngine.from_model_dir(dirs["across"], EngineConfig(block_size=4, num_kv_blocks=8, max_model_len=32))
    assert len(single.runner.k_cache) == 4
    assert len(across.runner.k_cache) == 3 and across.runner.cache_of_layer == [0, 1, 2, 2]
    # Same bytes per block for SingleInputKV as the base; 3 caches of 4 for AcrossKV g = 2 over the top half.
    base = LLMEngine.from_model_dir(dirs["base"], EngineConfig(block_size=4, num_kv_blocks=8, max_model_len=32))
    per_block = {e: kv_bytes_per_block(e.model, 4, torch.float32) for e in (base, single, across)}
    assert per_block[single] == per_block[base] and per_block[across] * 4 == per_block[base] * 3
    # The pool sized by memory holds 4/3 as many blocks; the two layers of the group really use one tensor.
    budget = EngineConfig(block_size=4, cpu_kv_cache_gb=per_block[base] * 300 / 1024**3,
                          max_num_seqs=1000, max_model_len=32)
    blocks = {n: LLMEngine.from_model_dir(dirs[n], budget).blocks.num_blocks for n in ("base", "across")}
    assert blocks["across"] == 400 and blocks["base"] == 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_decode_matches_transformers(dirs, reference):
    """On CUDA the decodes replay captured graphs, through the same SwiftKV path."""
    token_prompts, expected = reference
    cfg = EngineConfig(device="cuda", block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=8)
    eng = LLMEngine.from_model_dir(dirs["across"], cfg)
    assert eng.runner.graphs
    assert _greedy(eng, token_prompts) == expected["across"]
