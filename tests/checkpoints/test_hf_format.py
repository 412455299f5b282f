"""HF export/import against the real transformers: offline load, fp32 logits within 1e-4, exact round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glassbox.checkpoints.hf_format import (
    from_hf_state_dict,
    load_hf_model_dir,
    model_config_from_hf,
    save_hf_model_dir,
    to_hf_state_dict,
)
from glassbox.errors import GlassboxError

from ckpt_helpers import EOD, tiny_config, tiny_model

VARIANTS = [
    pytest.param(False, False, "LlamaForCausalLM", id="dense-untied"),
    pytest.param(False, True, "LlamaForCausalLM", id="dense-tied"),
    pytest.param(True, False, "MixtralForCausalLM", id="moe-untied"),
    pytest.param(True, True, "MixtralForCausalLM", id="moe-tied"),
]


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, 1), generator=g), torch.randint(0, vocab, (1, 7), generator=g),
            torch.randint(0, vocab, (3, 33), generator=g), torch.randint(0, vocab, (2, 64), generator=g)]


@pytest.mark.parametrize("moe,tie,arch", VARIANTS)
def test_transformers_loads_export_and_logits_match(tmp_path, tokenizer_dir, moe, tie, arch):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(moe=moe, tie=tie)
    model = tiny_model(cfg)
    out = save_hf_model_dir(model, tmp_path / "hf", tokenizer_dir / "tokenizer.json")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    assert hf.config.tie_word_embeddings is tie
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tie
    with torch.no_grad():
        for ids in prompts(cfg.vocab_size):
            ours, theirs = model(ids), hf(ids).logits
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max().item() < 1e-4, ids.shape


@pytest.mark.parametrize("moe,tie,arch", VARIANTS)
def test_import_round_trips_exactly(tmp_path, moe, tie, arch):
    cfg = tiny_config(moe=moe, tie=tie)
    model = tiny_model(cfg, seed=3)
    save_hf_model_dir(model, tmp_path / "hf")
    loaded, loaded_cfg = load_hf_model_dir(tmp_path / "hf")
    assert loaded_cfg == cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = prompts(cfg.vocab_size)[2]
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_import_reads_what_transformers_writes_and_its_fused_layout(tmp_path):
    """A Mixtral saved by transformers itself loads, and its in-memory fused gate_up layout converts too."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(moe=True)
    model = tiny_model(cfg, seed=5)
    save_hf_model_dir(model, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", local_files_only=True, dtype=torch.float32)
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    fused = from_hf_state_dict(dict(hf.state_dict()), cfg)
    hf.save_pretrained(tmp_path / "theirs")
    loaded, _ = load_hf_model_dir(tmp_path / "theirs")
    for name, tensor in model.state_dict().items():
        assert torch.equal(fused[name], tensor), name
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tokenizer_and_generation_config_load(tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    out = save_hf_model_dir(tiny_model(tiny_config()), tmp_path / "hf", tokenizer_dir / "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eod_id = raw.token_to_id(EOD)
    text = "def load(path):\n    return json.loads(path.read_text())"
    assert tok(text).input_ids == raw.encode(text).ids
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == EOD and tok.eos_token_id == eod_id
    gen = GenerationConfig.from_pretrained(out, local_files_only=True)
    assert gen.eos_token_id == eod_id
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eod_id


def test_sharded_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    model = tiny_model(cfg)
    out = save_hf_model_dir(model, tmp_path / "hf", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    ids = prompts(cfg.vocab_size)[2]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    loaded, _ = load_hf_model_dir(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_bf16_export_and_load_dtype(tmp_path):
    model = tiny_model(tiny_config())
    out = save_hf_model_dir(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = load_hf_model_dir(out, dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))


def test_bad_inputs_are_named(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(GlassboxError, match="model_type 'gpt2'"):
        model_config_from_hf(GPT2Config())
    with pytest.raises(GlassboxError, match="attention_bias"):
        model_config_from_hf(LlamaConfig(attention_bias=True))
    cfg = tiny_config()
    hf_sd = to_hf_state_dict(tiny_model(cfg).state_dict())
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(GlassboxError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf_state_dict(hf_sd, cfg)
    hf_sd = to_hf_state_dict(tiny_model(cfg).state_dict())
    hf_sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(GlassboxError, match=r"q_proj\.bias"):
        from_hf_state_dict(hf_sd, cfg)
    out = save_hf_model_dir(tiny_model(cfg), tmp_path / "hf")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GlassboxError, match="model.safetensors"):
        load_hf_model_dir(out)
    with pytest.raises(GlassboxError, match="no config.json"):
        load_hf_model_dir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(GlassboxError, match="not a model directory"):
        save_hf_model_dir(tiny_model(cfg), tmp_path / "notes")
