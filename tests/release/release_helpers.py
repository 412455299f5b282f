"""Helpers for the release tests (imported by name: test folders are not packages)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

RUN_STEPS = 4
CHECKPOINT_STEPS = [1, 2, 4]


def tiny_run_config(data_dir: Path, run_dir: Path):
    from glassbox.config import from_dict
    from glassbox.train.config import RunConfig

    return from_dict(RunConfig, {
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 64},
        "data": {"path": str(data_dir), "seq_len": 64, "seed": 11},
        "checkpoint": {"every": 0, "log_spaced": True},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"steps": RUN_STEPS, "warmup_steps": 1},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "parallel": {"device": "cpu"},
        "logging": {"val_samples": 4, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(run_dir),
        "seed": 5,
    })


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run_on_other_data(tiny_run: Path, data_dir: Path, tmp_path: Path) -> Path:
    """A copy of `tiny_run` whose config points at a copy of `data_dir` that is another store: its meta.json
    differs (a setting) and is consistent (its fingerprint recomputed), as a store prepared otherwise would be."""
    from glassbox.data.store import canonical_sha256

    data = copy_tree(data_dir, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    meta["settings"]["prepared_elsewhere"] = True
    meta["fingerprint"] = canonical_sha256({k: v for k, v in meta.items() if k != "fingerprint"})
    (data / "meta.json").write_text(json.dumps(meta))
    run = copy_tree(tiny_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run
