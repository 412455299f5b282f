"""Helpers of the pruning tests: train a tiny MoE for real (a few steps on the shared corpus) and export it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from train_testlib import tiny_config  # noqa: E402

from glassbox.checkpoints.export import export_checkpoint  # noqa: E402
from glassbox.train.checkpointing import CheckpointCallback  # noqa: E402
from glassbox.train.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)

# 8 experts, top-2, hidden 64, 2 layers: the smallest MoE where dropping experts and pruning weights both mean
# something. 12 steps at lr 1e-2 leave the router with real preferences (not the uniform routing of init).
MOE = ("model.num_experts=8", "model.experts_per_token=2", "model.intermediate_size=64", "schedule.steps=12")


def train_and_export(prepared_data: Path, root: Path, *overrides: str) -> Path:
    cfg = tiny_config(prepared_data, root / "run", *MOE, *overrides)
    dirs = cfg.data.dirs()
    Trainer(cfg, callbacks=[CheckpointCallback(cfg.checkpoint, Path(cfg.run_dir), tokenizer_dir=dirs[0])]).fit()
    return export_checkpoint(root / "run", root / "hf")
