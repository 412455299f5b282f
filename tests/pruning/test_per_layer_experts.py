"""Per-layer expert counts and top-k survive training, checkpoints, export, transformers and the engine."""

from __future__ import annotations

import json

import pytest
import torch
from pruning_helpers import train_and_export

from glassbox.checkpoints.export import load_model_from_checkpoint
from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.config import ConfigError
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.transformer import ModelConfig, Transformer

PER_LAYER = ("model.layer_num_experts=[8,3]", "model.layer_experts_per_token=[2,1]")


@pytest.fixture(scope="module")
def per_layer_run(prepared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("per_layer")
    return root, train_and_export(prepared_data, root, *PER_LAYER)


def test_per_layer_counts_round_trip_train_checkpoint_export(per_layer_run):
    root, hf_dir = per_layer_run
    model, manifest = load_model_from_checkpoint(root / "run")
    assert manifest["model"]["layer_num_experts"] == [8, 3]
    assert [layer.mlp.gate_proj.shape[0] for layer in model.layers] == [8, 3]
    assert [layer.mlp.top_k for layer in model.layers] == [2, 1]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "glassbox_moe"
    assert config["num_local_experts_per_layer"] == [8, 3]
    assert config["num_experts_per_tok_per_layer"] == [2, 1]
    loaded, cfg = load_hf_model_dir(hf_dir)
    assert (cfg.layer_num_experts, cfg.layer_experts_per_token) == ([8, 3], [2, 1])
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_transformers_logits_equal_glassbox_for_per_layer_model(per_layer_run):
    from transformers import AutoModelForCausalLM

    _, hf_dir = per_layer_run
    ours, cfg = load_hf_model_dir(hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "GlassboxMoeForCausalLM"
    assert [layer.mlp.experts.num_experts for layer in theirs.model.layers] == [8, 3]
    x = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=2e-5, rtol=1e-5)


def test_engine_greedy_equals_transformers_for_per_layer_model(per_layer_run):
    from transformers import AutoModelForCausalLM

    _, hf_dir = per_layer_run
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    llm = LLM(hf_dir)
    prompts = [llm.tokenizer.encode(p) for p in ("def read(path):", "import os\n", "class Parser:\n    def")]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))]
    with torch.no_grad():
        for ids, out in zip(prompts, got):
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=16, do_sample=False)
            assert out == gen[0, len(ids):].tolist()


def test_uniform_per_layer_lists_export_as_mixtral(tmp_path):
    from glassbox.checkpoints.hf_format import save_hf_model_dir

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=16, num_experts=4, layer_num_experts=[4, 4], layer_experts_per_token=[1, 1])
    save_hf_model_dir(Transformer(cfg), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_experts_per_tok"] == 1


@pytest.mark.parametrize("fields, message", [
    ({"layer_num_experts": [4]}, "has 1 entries for 2 layers"),
    ({"layer_num_experts": [4, 3], "layer_experts_per_token": [2, 4]}, "layer 1 routes each token to 4"),
    ({"layer_num_experts": [3, 3]}, "must equal the largest"),
    ({"num_experts": 0, "layer_num_experts": [4, 4]}, "need an MoE model"),
])
def test_bad_per_layer_settings_are_named(fields, message):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=16,
                num_experts=4)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **fields}).validate()
