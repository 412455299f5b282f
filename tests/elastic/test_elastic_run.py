"""`glassbox elastic run` on real gloo ranks: 1 -> 2 -> 1 workers, the same data order, the same training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
SETTINGS = ["schedule.steps=12", "batch.global_batch_size=8", "batch.micro_batch_size=4", "logging.val_every=0"]


@pytest.mark.slow
def test_one_two_one_workers_train_as_one(prepared_data, tmp_path):
    run = tmp_path / "elastic"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(apply_overrides(tiny_dict(prepared_data, run), SETTINGS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "glassbox.cli", "elastic", "run", "--config", str(config), "--nproc", "1",
           "--max-nproc", "2", "--resize-at", "4:2", "--resize-at", "8:1", "--elastic-set", "adapt_batch=false",
           "--elastic-set", "decide_every=3", "--elastic-set", "warmup_steps=1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The uninterrupted reference: one process, the same plan and agent.
    ref = tmp_path / "ref"
    cfg = tiny_config(prepared_data, ref, *SETTINGS)
    elastic = ElasticConfig(adapt_batch=False, decide_every=3, warmup_steps=1)
    plan = PolluxPlan(8, 4, elastic.measure_every)
    Trainer(cfg, callbacks=default_callbacks(cfg) + [PolluxAgent(elastic, plan)], plan=plan).fit()

    rows = [r for r in read_metrics(run) if "loss" in r]
    expected = [r for r in read_metrics(ref) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["world_size"] for r in rows] == [1] * 4 + [2] * 4 + [1] * 4
    # Same data order: every step took the same samples (the cursor and the hash of the global batch).
    log, ref_log = DataOrderLog(run, read_only=True), DataOrderLog(ref, read_only=True)
    for step in range(1, 13):
        a, b = log.row(step), ref_log.row(step)
        assert (a["cursor_start"], a["batch_size"], a["token_hash"]) == (b["cursor_start"], b["batch_size"],
                                                                        b["token_hash"]), step
    # Training continued where it stopped: the loss curve is the reference's up to float differences.
    for a, b in zip(rows, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), a["step"]
    events = read_manifest(run)["elastic_events"]
    assert [(e["step"], e["from_nproc"], e["to_nproc"], e["reason"]) for e in events] == [
        (4, 1, 2, "planned"), (8, 2, 1, "planned")]
    assert [h["world_size"] for h in read_manifest(run)["world_size_history"]] == [1, 2, 1]
    decisions = [r for r in read_metrics(run) if r.get("event") == "pollux"]
    assert {d["replicas"] for d in decisions} == {1, 2}
