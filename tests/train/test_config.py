"""Run configs: the bundled ones load with the shapes they promise; bad ones are one-line errors naming the field."""

from __future__ import annotations

import pytest

from glassbox.cli import main
from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.train.cli import CONFIGS_DIR
from glassbox.train.config import load_run_config
from train_testlib import tiny_config


@pytest.mark.parametrize("name,low,high", [("tiny", 1e6, 5e6), ("moe-tiny", 1e6, 5e6), ("small", 100e6, 150e6),
                                           ("1b", 0.9e9, 1.3e9), ("amber-7b", 6.6e9, 6.9e9)])
def test_bundled_configs_load_with_their_sizes(name, low, high):
    cfg = load_run_config(CONFIGS_DIR / f"{name}.yaml")
    assert low <= cfg.model.num_params() <= high
    assert cfg.model.is_moe == (name == "moe-tiny")


def test_amber_recipe():
    cfg = load_run_config(CONFIGS_DIR / "amber-7b.yaml")
    m, o = cfg.model, cfg.optimizer
    assert (m.num_layers, m.hidden_size, m.num_heads, m.vocab_size, cfg.data.seq_len) == (32, 4096, 32, 32000, 2048)
    assert (o.lr, o.min_lr, o.weight_decay, o.betas, o.grad_clip) == (3e-4, 3e-5, 0.1, [0.9, 0.95], 1.0)
    assert cfg.schedule.warmup_steps == 2000 and cfg.schedule.decay == "cosine"


@pytest.mark.parametrize("override,message", [
    ("model.hiden_size=64", "unknown config key model.hiden_size"),
    ("optimizer.lr=fast", "optimizer.lr: expected float"),
    ("batch.global_batch_size=0", "batch.global_batch_size: must be positive"),
    ("parallel.data_parallel=zero3", "parallel.data_parallel: expected one of"),
    ("data.seq_len=128", "data.seq_len (128) exceeds model.max_seq_len (64)"),
    ("schedule.warmup_steps=100", "schedule.warmup_steps (100) exceeds schedule.steps"),
    ("batch.schedule=[{from_step: 3, size: 4}, {from_step: 2, size: 8}]", "batch.schedule[1].from_step"),
    ("parallel.tensor_parallel=2", None),
    ("logging.wandb.mode=cloud", "logging.wandb.mode: expected one of"),
])
def test_bad_values_name_the_field(tmp_path, override, message):
    if message is None:  # valid alone: tensor parallel with the default FSDP is allowed
        tiny_config(tmp_path, tmp_path / "run", override)
        with pytest.raises(ConfigError, match="tensor parallel needs fsdp"):
            tiny_config(tmp_path, tmp_path / "run", override, "parallel.data_parallel=ddp")
        return
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path / "run", override)
    assert message in str(e.value)


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: two\n")
    assert main(["train", "--config", str(bad), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "glassbox: error: model.num_layers: expected int, got 'two'"
    assert main(["train", "--config", "no-such-config"]) == 2
    assert "config not found: no-such-config" in capsys.readouterr().err


def test_trainer_refuses_a_vocab_smaller_than_the_data(prepared_data, tmp_path):
    from glassbox.train.trainer import Trainer

    cfg = tiny_config(prepared_data, tmp_path / "run", "model.vocab_size=256")
    with pytest.raises(GlassboxError, match=r"model.vocab_size \(256\) is smaller than the vocabulary"):
        Trainer(cfg, callbacks=[])


def test_tensor_parallel_must_divide_heads():
    from glassbox.models.transformer import ModelConfig
    from glassbox.train.parallel import check_tensor_parallel

    with pytest.raises(ConfigError, match=r"model.num_kv_heads \(2\) must divide by parallel.tensor_parallel \(4\)"):
        check_tensor_parallel(ModelConfig(num_heads=4, num_kv_heads=2), 4)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from glassbox.train.trainer import Trainer

    with pytest.raises(GlassboxError, match="no such directory"):
        Trainer(tiny_config(tmp_path / "nowhere", tmp_path / "run"), callbacks=[])
