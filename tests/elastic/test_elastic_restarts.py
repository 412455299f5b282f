"""`glassbox elastic run` restarting real gloo ranks for the two reasons nobody plans: the agent's goodput model
asks for another worker, and a worker is lost (SIGKILL). Each restart resumes from the latest checkpoint and
continues the same world-free data order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_testlib import tiny_config, tiny_dict  # noqa: E402

from glassbox.config import apply_overrides  # noqa: E402
from glassbox.data.order_log import DataOrderLog  # noqa: E402
from glassbox.elastic.agent import PolluxAgent, PolluxPlan  # noqa: E402
from glassbox.elastic.config import ElasticConfig  # noqa: E402
from glassbox.train.manifest import read_manifest  # noqa: E402
from glassbox.train.metrics_log import read_metrics  # noqa: E402
from glassbox.train.trainer import Trainer, default_callbacks  # noqa: E402

torch.set_num_threads(1)
BATCH = ["batch.global_batch_size=8", "batch.micro_batch_size=4", "logging.val_every=0"]


def launch(data: Path, tmp_path: Path, settings: list[str], *flags: str) -> tuple[subprocess.Popen, Path]:
    run = tmp_path / "elastic"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(apply_overrides(tiny_dict(data, run), BATCH + settings)))
    cmd = [sys.executable, "-m", "glassbox.cli", "elastic", "run", "--config", str(config), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), run


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]


def steps_by_number(run: Path) -> dict[int, dict]:
    """The last row of each step (a step re-run after a resume is logged again; the later row is the one kept)."""
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def events(run: Path) -> list[tuple]:
    return [(e["step"], e["from_nproc"], e["to_nproc"], e["reason"]) for e in read_manifest(run)["elastic_events"]]


def assert_contiguous_order(run: Path, steps: int) -> None:
    log = DataOrderLog(run, read_only=True)
    for step in range(1, steps):
        a, b = log.row(step), log.row(step + 1)
        assert b["cursor_start"] == a["cursor_start"] + a["batch_size"], step


@pytest.mark.slow
def test_goodput_model_asks_for_a_second_worker(prepared_data, tmp_path):
    # One decision, at step 8 (warmup 5, every 4). The loop has already queued step 9 by then (it prefetches a
    # step ahead), so the run stops after step 9 with its checkpoint; after the restart there the next decision
    # would be at 14 > 12, so the run resizes exactly once. max_batch 16 keeps the batch: the decision is the world size alone. Its model
    # has seen one replica only, so two replicas' sync time is the prior's (15% of a pass, overlapped): half the
    # step time for the same 16 samples, well over the 5% switching threshold. 8 micro-batches of 2 give the noise
    # scale 7 (small, big) pairs per step: a positive |G|^2 from the first measured step on.
    settings = ["schedule.steps=12", "batch.global_batch_size=16", "batch.micro_batch_size=2"]
    proc, run = launch(prepared_data, tmp_path, settings, "--nproc", "1", "--max-nproc", "2",
                       "--elastic-set", "resize=true", "--elastic-set", "restart_penalty_s=0",
                       "--elastic-set", "decide_every=4", "--elastic-set", "warmup_steps=5",
                       "--elastic-set", "max_batch=16")
    finish(proc)
    assert events(run) == [(9, 1, 2, "goodput")]
    rows = steps_by_number(run)
    assert sorted(rows) == list(range(1, 13))
    assert [rows[s]["world_size"] for s in range(1, 13)] == [1] * 9 + [2] * 3
    decision = next(r for r in read_metrics(run) if r.get("event") == "pollux" and r["step"] == 8)
    assert decision["replicas"] == 1 and decision["resize"]["nproc"] == 2
    assert decision["resize"]["predicted_goodput"] > 1.05 * decision["resize"]["current_goodput"]
    assert {rows[s]["batch_size"] for s in rows} == {16}
    assert_contiguous_order(run, 12)


def training_ranks(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "glassbox.elastic.worker" in " ".join(child.cmdline()) and "torch.distributed.run" not in \
                    " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


@pytest.mark.slow
def test_lost_worker_restarts_with_one_fewer_from_the_checkpoint(prepared_data, tmp_path):
    steps = 24
    settings = [f"schedule.steps={steps}", "checkpoint.every=4"]
    proc, run = launch(prepared_data, tmp_path, settings, "--nproc", "2", "--min-nproc", "1",
                       "--elastic-set", "adapt_batch=false")
    first = run / "checkpoints" / "step_000004"       # committed by rename: it exists only once complete
    deadline = time.monotonic() + 120
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = training_ranks(proc.pid)
    assert first.is_dir() and len(ranks) == 2, "the run ended or never checkpointed before the kill"
    os.kill(max(ranks, key=lambda p: p.pid).pid, signal.SIGKILL)
    finish(proc)

    (step, from_nproc, to_nproc, reason), = events(run)
    assert (from_nproc, to_nproc) == (2, 1) and reason.startswith("workers lost") and step % 4 == 0 and step >= 4
    rows = steps_by_number(run)
    assert sorted(rows) == list(range(1, steps + 1))
    assert [rows[s]["world_size"] for s in rows] == [2] * step + [1] * (steps - step)

    # The right state: an uninterrupted single-process run took the same samples at every step, and the resumed
    # run's first step (model, optimizer and data cursor from the checkpoint) has its loss.
    ref = tmp_path / "ref"
    cfg = tiny_config(prepared_data, ref, *BATCH, *settings)
    elastic = ElasticConfig(adapt_batch=False)
    plan = PolluxPlan(8, 4, elastic.measure_every)
    Trainer(cfg, callbacks=default_callbacks(cfg) + [PolluxAgent(elastic, plan)], plan=plan).fit()
    expected = steps_by_number(ref)
    log, ref_log = DataOrderLog(run, read_only=True), DataOrderLog(ref, read_only=True)
    for s in range(1, steps + 1):
        a, b = log.row(s), ref_log.row(s)
        assert (a["cursor_start"], a["batch_size"], a["token_hash"]) == (b["cursor_start"], b["batch_size"],
                                                                        b["token_hash"]), s
    assert rows[step + 1]["loss"] == pytest.approx(expected[step + 1]["loss"], rel=2e-3)
    assert rows[steps]["loss"] == pytest.approx(expected[steps]["loss"], rel=2e-2)
