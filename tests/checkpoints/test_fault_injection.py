"""Fault injection: a 2-rank run whose ranks are killed with SIGKILL at random moments, and resumed each time,
ends with the weights of a run that was never interrupted, bit for bit."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from glassbox.checkpoints.export import load_model_from_checkpoint

STEPS = 12
KILLS = 2


def _config(path: Path, data: Path) -> Path:
    cfg = {
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32},
        "data": {"path": str(data), "seq_len": 32, "seed": 7},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"steps": STEPS, "warmup_steps": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 8, "progress": False, "wandb": {"mode": "disabled"}},
        "parallel": {"device": "cpu", "data_parallel": "fsdp"},
        "checkpoint": {"every": 2},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, run: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "-m", "glassbox.train", "--config", str(config), "--run-dir", str(run)]
    if resume:
        cmd += ["--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    return out


def _live_trainers(pid: int) -> list[psutil.Process]:
    """The launcher's training ranks still running. A child that exits while we list them (a zombie not yet reaped,
    or gone) is not one to kill, so it is skipped instead of failing the listing."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "glassbox.train" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def test_random_kills_of_a_rank_resume_to_the_uninterrupted_weights(prepared_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data, ignore=shutil.ignore_patterns("cache"))
    config = _config(tmp_path / "run.yaml", data)

    started = time.perf_counter()
    straight = _launch(config, tmp_path / "straight", resume=False)
    out = _finish(straight)
    assert straight.returncode == 0, out
    duration = time.perf_counter() - started

    rng = random.Random(20261201)
    run = tmp_path / "faulted"
    kills = 0
    while kills < KILLS:
        proc = _launch(config, run, resume=True)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        workers = _live_trainers(proc.pid)
        if proc.poll() is not None or not workers:
            _finish(proc)
            continue                           # it finished (or had not started a rank) before the kill
        os.kill(rng.choice(workers).pid, signal.SIGKILL)
        kills += 1
        _finish(proc)
    last = _launch(config, run, resume=True)
    out = _finish(last)
    assert last.returncode == 0, out

    a, _ = load_model_from_checkpoint(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:06d}")
    b, _ = load_model_from_checkpoint(run / "checkpoints" / f"step_{STEPS:06d}")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not list((run / "checkpoints").glob("*.tmp"))
