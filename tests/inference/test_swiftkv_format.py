"""SwiftKV transform and format: l = L is the base model, a converted directory loads in transformers (its own
model_type, no trust_remote_code) with glassbox's logits, initialisation as ALGORITHMS.md says, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import glassbox  # noqa: F401  (registers the SwiftKV model type with transformers)
from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.checkpoints.hf_swiftkv import MODEL_TYPE, convert, load_swiftkv_model_dir
from glassbox.cli import main
from glassbox.errors import GlassboxError
from glassbox.models.swiftkv import SwiftKVConfig, swiftkv_from_base

IDS = torch.tensor([[5, 17, 300, 2, 99, 410, 7, 63, 12, 250, 1, 34]])


def test_transform_at_the_last_layer_is_the_base_model(llama_dir):
    base, cfg = load_hf_model_dir(llama_dir)
    model = swiftkv_from_base(base, SwiftKVConfig(cfg.num_layers))
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


def deep_model():
    from glassbox.models.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=512, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                   intermediate_size=48, max_seq_len=32)).eval()


def test_student_differs_and_teacher_is_the_base(llama_dir):
    """Layer l's own KV is unchanged at initialisation (its input norm and projections are copied); the layers
    above it read h_l instead of their own input, so from l + 1 on the student differs."""
    base, _ = load_hf_model_dir(llama_dir)
    with torch.no_grad():
        assert torch.equal(swiftkv_from_base(base, SwiftKVConfig(1))(IDS), base(IDS))
        deep = deep_model()
        model = swiftkv_from_base(deep, SwiftKVConfig(2))
        assert torch.equal(model(IDS, swiftkv=False), deep(IDS))
        assert not torch.allclose(model(IDS), deep(IDS), atol=1e-3)


def test_initialisation_copies_and_group_means(llama_dir, tmp_path):
    """Layer 0 of 2 with group 2: one K/V projection, the mean of both layers'; Q copies; the norm is layer 0's."""
    base, _ = load_hf_model_dir(llama_dir)
    model = swiftkv_from_base(base, SwiftKVConfig(1, 1))
    assert torch.equal(model.swiftkv_norm.weight, base.layers[1].input_layernorm.weight)
    assert torch.equal(model.swiftkv_q_proj["1"].weight, base.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.swiftkv_k_proj["1"].weight, base.layers[1].self_attn.k_proj.weight)
    # A 4-layer base makes room for a group of 2 above layer 2.
    deep = deep_model()
    across = swiftkv_from_base(deep, SwiftKVConfig(2, 2))
    assert list(across.swiftkv_k_proj) == ["2"] and list(across.swiftkv_q_proj) == ["2", "3"]
    mean = (deep.layers[2].self_attn.v_proj.weight + deep.layers[3].self_attn.v_proj.weight) / 2
    torch.testing.assert_close(across.swiftkv_v_proj["2"].weight, mean, rtol=0, atol=1e-7)
    assert SwiftKVConfig(2, 2).cache_of_layer(4) == [0, 1, 2, 2]
    assert SwiftKVConfig(2, 2).num_kv_caches(4) == 3


def test_converted_directory_loads_in_transformers_with_glassbox_logits(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "skv"
    assert main(["swiftkv", "convert", str(llama_dir), "--layer", "1", "--out", str(out)]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == MODEL_TYPE and (raw["swiftkv_layer"], raw["swiftkv_group"]) == (1, 1)
    assert (out / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    ours, skv = load_swiftkv_model_dir(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "GlassboxSwiftKVForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(IDS, swiftkv=False).logits, ours(IDS, swiftkv=False), rtol=1e-5,
                                   atol=1e-5)


def test_bad_input_is_a_clear_error(llama_dir, mixtral_dir, tmp_path):
    with pytest.raises(GlassboxError, match=r"--layer 0: must be in \[1, 2\]"):
        convert(llama_dir, 0, 1, tmp_path / "a")
    with pytest.raises(GlassboxError, match=r"--layer 3: must be in \[1, 2\]"):
        convert(llama_dir, 3, 1, tmp_path / "a")
    with pytest.raises(GlassboxError, match="--group 2: does not divide the 1 layers from layer 1"):
        convert(llama_dir, 1, 2, tmp_path / "a")
    with pytest.raises(GlassboxError, match="model_type 'mixtral' is not supported by swiftkv"):
        convert(mixtral_dir, 1, 1, tmp_path / "a")
    assert main(["swiftkv", "convert", str(llama_dir), "--layer", "9", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
