"""`glassbox train` in this process, and `glassbox train --nproc 2` through a real torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from glassbox.cli import main
from glassbox.data.order_log import DataOrderLog
from glassbox.train.metrics_log import read_metrics
from train_testlib import tiny_dict


def _config_file(tmp_path, data_dir):
    cfg = tiny_dict(data_dir, tmp_path / "unused")
    cfg["data"]["path"] = "placeholder"
    path = tmp_path / "tiny-test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_glassbox_train_shortcut_flags(prepared_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--config", str(_config_file(tmp_path, prepared_data)), "--data", str(prepared_data),
                 "--run-dir", str(run), "--steps", "3", "--set", "schedule.warmup_steps=1",
                 "--set", "optimizer.lr=2e-3"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"trained 3 steps (1,536 tokens) into {run}" in out and "validation loss" in out
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["lr"] == 2e-3
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["path"] == str(prepared_data) and resolved["schedule"]["steps"] == 3


def test_glassbox_train_nproc_2_runs_torchrun(prepared_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "glassbox.cli", "train", "--nproc", "2", "--config",
           str(_config_file(tmp_path, prepared_data)), "--data", str(prepared_data), "--run-dir", str(run),
           "--steps", "2", "--set", "schedule.warmup_steps=1", "--set", "parallel.data_parallel=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2 steps" in proc.stdout
    rows = read_metrics(run)
    assert [(r["step"], r["world_size"], r["batch_size"]) for r in rows] == [(1, 2, 8), (2, 2, 8)]
    assert len(DataOrderLog(run, read_only=True)) == 2
