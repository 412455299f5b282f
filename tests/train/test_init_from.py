"""init_from: a run starts from a Hugging Face directory's weights, shape and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glassbox.checkpoints.hf_format import load_hf_model_dir, save_hf_model_dir
from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.models.loss import next_token_loss
from glassbox.models.transformer import ModelConfig, Transformer
from glassbox.train.config import run_config_from_dict
from glassbox.train.trainer import Trainer
from train_testlib import tiny_dict

SHAPE = dict(vocab_size=512, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_seq_len=128, tie_embeddings=False)


@pytest.fixture(scope="module")
def pretrained(prepared_data: Path, tmp_path_factory) -> Path:
    """A 'pretrained' model directory (random weights of another shape than the tiny config's) with the
    prepared data's tokenizer."""
    torch.manual_seed(3)
    model = Transformer(ModelConfig(**SHAPE))
    out = tmp_path_factory.mktemp("pretrained") / "model"
    return save_hf_model_dir(model, out, tokenizer_json=prepared_data / "tokenizer.json")


def init_dict(data: Path, run_dir: Path, model_dir: Path) -> dict:
    d = tiny_dict(data, run_dir)
    d["init_from"] = str(model_dir)
    d["model"] = {"max_seq_len": 64}      # the only field given: the rest comes from the directory
    d["schedule"] = {"steps": 2, "warmup_steps": 0}
    return d


def test_run_starts_from_the_directory_weights(prepared_data, pretrained, tmp_path):
    cfg = run_config_from_dict(init_dict(prepared_data, tmp_path / "run", pretrained))
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.tie_embeddings) == (48, 3, False)
    assert cfg.model.max_seq_len == 64
    trainer = Trainer(cfg, callbacks=[])
    reference, _ = load_hf_model_dir(pretrained)
    for name, p in reference.state_dict().items():
        assert torch.equal(trainer.state.model.state_dict()[name], p), name
    # The first step's loss is the pretrained model's own loss on that batch (the step trains after it).
    first = trainer.state.sampler.samples(0, cfg.batch.global_batch_size)
    with torch.no_grad():
        expected = next_token_loss(reference(first[:, :-1]), first[:, 1:]).item()
    row = trainer.train_step()
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    # config.yaml records the resolved shape, so the run reloads (and resumes) as it ran.
    from glassbox.train.config import load_run_config

    again = load_run_config(tmp_path / "run" / "config.yaml")
    assert again.model == cfg.model and again.init_from == str(pretrained)


def test_model_fields_must_agree_with_the_directory(prepared_data, pretrained, tmp_path):
    d = init_dict(prepared_data, tmp_path / "run", pretrained)
    d["model"]["hidden_size"] = 64
    with pytest.raises(ConfigError, match="model.hidden_size: 64 is set, but init_from .* has 48"):
        run_config_from_dict(d)
    d = init_dict(prepared_data, tmp_path / "run", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="init_from: .*nowhere has no config.json"):
        run_config_from_dict(d)


def test_data_of_another_tokenizer_is_refused(prepared_data, pretrained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in pretrained.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = run_config_from_dict(init_dict(prepared_data, tmp_path / "run", other))
    with pytest.raises(GlassboxError, match="tokenized with .* not with .*other/tokenizer.json.*--tokenizer"):
        Trainer(cfg, callbacks=[])


def test_an_export_chats_like_the_base(prepared_data, pretrained, tmp_path):
    """The data holds the tokenizer alone; the checkpoint carries the base's chat template and special tokens,
    so the exported fine-tune renders chats as the base does and stops at the base's eos as well."""
    from transformers import AutoTokenizer

    from glassbox.checkpoints.export import export_checkpoint

    base = tmp_path / "base"
    base.mkdir()
    for f in pretrained.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    d = init_dict(prepared_data, tmp_path / "run", base)
    d["checkpoint"] = {"every": 2}
    Trainer(run_config_from_dict(d)).fit()
    out = export_checkpoint(tmp_path / "run", tmp_path / "export")
    chat = [{"role": "user", "content": "hello"}]
    rendered = [AutoTokenizer.from_pretrained(p).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                for p in (base, out)]
    assert rendered[0] == rendered[1] == "[user] hello\n[assistant] "
    generation = json.loads((out / "generation_config.json").read_text())
    eod = json.loads((prepared_data / "meta.json").read_text())["eod_id"]
    assert generation["eos_token_id"] == eod     # the base's eos is the data's end-of-text here: listed once
