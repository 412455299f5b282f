"""Training refuses a token store changed after prepare, when it starts and when it resumes."""

from __future__ import annotations

import json

import pytest
import torch

from glassbox.errors import GlassboxError
from glassbox.train.config import run_config_from_dict
from glassbox.train.trainer import Trainer

torch.set_num_threads(1)


def _config(data_dir, run_dir, **extra):
    cfg = {
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32},
        "data": {"path": str(data_dir), "seq_len": 32, "seed": 7},
        "schedule": {"steps": 4, "warmup_steps": 1},
        "batch": {"global_batch_size": 4, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 4, "progress": False, "wandb": {"mode": "disabled"}},
        "parallel": {"device": "cpu"},
        "checkpoint": {"every": 2},
        "run_dir": str(run_dir),
    }
    for section, values in extra.items():
        cfg[section].update(values)
    return run_config_from_dict(cfg)


def _zero_half(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


def test_training_on_a_changed_store_stops_at_start_and_on_resume(store_copy, tmp_path):
    Trainer(_config(store_copy, tmp_path / "run")).fit()
    _zero_half(store_copy / "train.bin")
    with pytest.raises(GlassboxError, match=r"train\.bin bytes .* do not match their sha256 from prepare"):
        Trainer(_config(store_copy, tmp_path / "fresh")).fit()
    resumed = _config(store_copy, tmp_path / "run", schedule={"steps": 6}, checkpoint={"resume": "auto"})
    with pytest.raises(GlassboxError, match=r"train\.bin bytes .* the store was modified"):
        Trainer(resumed).fit()


def test_the_override_trains_anyway_and_is_recorded(store_copy, tmp_path):
    _zero_half(store_copy / "train.bin")
    Trainer(_config(store_copy, tmp_path / "run", data={"verify": False})).fit()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]["verified"] is False


def test_an_edited_meta_json_is_refused(store_copy, tmp_path):
    meta = json.loads((store_copy / "meta.json").read_text())
    meta["chunks"]["train.bin"][0] = "0" * 64
    (store_copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GlassboxError, match="meta.json was edited"):
        Trainer(_config(store_copy, tmp_path / "run"))
