"""Fault injection: a 2-rank run whose ranks are killed with SIGKILL at random moments of its training, and
resumed each time, ends with the weights of a run that was never interrupted, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from glassbox.checkpoints.export import load_model_from_checkpoint
from glassbox.checkpoints.layout import checkpoints_root, list_checkpoints
from glassbox.train.metrics_log import read_metrics

STEPS = 16
EVERY = 2                  # checkpoint interval
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
        "checkpoint": {"every": EVERY},
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


def _committed(run: Path) -> int:
    """The step of the run's newest committed checkpoint (0 before the first)."""
    return max((step for step, _ in list_checkpoints(checkpoints_root(run))), default=0)


def _kill_after(proc: subprocess.Popen, run: Path, target: int, delay: float, rng: random.Random) -> None:
    """SIGKILL one of the launcher's ranks `delay` seconds after checkpoint `target` is committed: a moment inside
    training, after a real checkpoint, rather than one inside the seconds of imports that precede every step."""
    checkpoint = run / "checkpoints" / f"step_{target:06d}"
    deadline = time.monotonic() + 240
    while not checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    workers = _live_trainers(proc.pid)
    assert checkpoint.is_dir() and proc.poll() is None and workers, f"the run ended before its kill after {target}"
    os.kill(rng.choice(workers).pid, signal.SIGKILL)


def test_random_kills_of_a_rank_resume_to_the_uninterrupted_weights(indexed_data, tmp_path):
    config = _config(tmp_path / "run.yaml", indexed_data)
    straight = _launch(config, tmp_path / "straight", resume=False)
    out = _finish(straight)
    assert straight.returncode == 0, out
    # The first step also waits for the slower rank to start: the rest say how long a step takes.
    rows = read_metrics(tmp_path / "straight", required=True)
    step_time = statistics.median(r["step_time"] for r in rows if "step_time" in r and r["step"] > 1)

    # Each kill comes after a random committed checkpoint newer than the one its launch resumes from, then at a
    # random moment of the next EVERY steps (their checkpoint's write included). Every kill keeps 3 * EVERY steps
    # for each one still to come (room for a launch that runs up to twice as fast as the straight one), so every
    # launch but the last is killed, and the last resumes a run that was killed.
    rng = random.Random(20261201)
    run = tmp_path / "faulted"
    for kill in range(KILLS):
        target = rng.randrange(_committed(run) + EVERY, STEPS - 3 * EVERY * (KILLS - kill) + 1, EVERY)
        proc = _launch(config, run, resume=True)
        _kill_after(proc, run, target, rng.uniform(0, EVERY * step_time), rng)
        _finish(proc)
        assert proc.returncode != 0
    last = _launch(config, run, resume=True)
    out = _finish(last)
    assert last.returncode == 0, out
    assert "[checkpoint] resumed from" in out, out

    a, _ = load_model_from_checkpoint(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:06d}")
    b, _ = load_model_from_checkpoint(run / "checkpoints" / f"step_{STEPS:06d}")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not list((run / "checkpoints").glob("*.tmp"))
