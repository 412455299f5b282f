"""The executor on a real local Ray cluster: two real glassbox training jobs, one resized from 2 gloo ranks to 1
from its latest checkpoint while the other starts in the freed slot; and PolluxSched driving two adaptive jobs
from their agents' own goodput reports."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from glassbox.elastic.goodput import GoodputModel
from glassbox.elastic.sched.executor import ExecutorError, JobRequest, RayExecutor, observed_speedup, schedule
from glassbox.elastic.sched.pollux import PolluxPolicy
from glassbox.elastic.throughput import ThroughputParams
from glassbox.train.metrics_log import read_metrics

STEPS = 8


def tiny_config(path, data_dir):
    path.write_text(yaml.safe_dump({
        "model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128, "max_seq_len": 64},
        "data": {"path": str(data_dir), "seq_len": 64, "seed": 7},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"steps": STEPS, "warmup_steps": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 16, "progress": False, "wandb": {"mode": "disabled"}},
    }))
    return str(path)


def wait_for_checkpoint(run_dir, timeout=400.0):
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / "latest").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint in {run_dir} after {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow
def test_two_real_jobs_and_a_resize(prepared_data, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", prepared_data)
    a = JobRequest("a", config, tmp_path / "a", steps=STEPS, replicas=2, checkpoint_every=2)
    b = JobRequest("b", config, tmp_path / "b", steps=STEPS, replicas=1, checkpoint_every=2)
    with RayExecutor(slots=2) as ex:
        ex.submit(a)
        ex.submit(b)
        with pytest.raises(ExecutorError, match="ask for 3 workers but the cluster has 2"):
            ex.apply({"a": 2, "b": 1})
        ex.apply({"a": 2})
        assert ex.poll() == {"a": "running", "b": "pending"}
        wait_for_checkpoint(a.run_dir)
        ex.apply({"a": 1, "b": 1})            # a shrinks to one rank, b takes the freed slot
        ex.wait(["a", "b"], timeout=600)
        history = ex.history()
    assert [r["world_size"] for r in history["a"]] == [2, 1]
    assert [r["world_size"] for r in history["b"]] == [1]
    rows_a = read_metrics(a.run_dir, required=True)
    assert [r["step"] for r in rows_a] == list(range(1, STEPS + 1))      # continuous across the resize
    worlds = [r["world_size"] for r in rows_a]
    assert worlds[0] == 2 and worlds[-1] == 1 and worlds == sorted(worlds, reverse=True)
    assert [r["step"] for r in read_metrics(b.run_dir, required=True)] == list(range(1, STEPS + 1))
    assert (a.run_dir / "checkpoints" / f"step_{STEPS:06d}").is_dir()
    # What the scheduler learns from a's own steps at both sizes: the agent's throughput model, relative to 1 rank.
    table = observed_speedup(a, slots=2, fair=1)
    assert table[1, 1] == 1.0 and table[1, 2] > 0 and table[0].sum() == 0


def test_a_request_larger_than_the_cluster_is_refused(tmp_path):
    ex = RayExecutor(slots=2)
    with pytest.raises(ExecutorError, match="job 'big' asks for 4 workers but the cluster has 2"):
        ex.submit(JobRequest("big", "tiny", tmp_path / "big", steps=1, replicas=4))


def test_a_job_that_committed_its_last_step_is_finished_not_restarted(prepared_data, tmp_path):
    # What a run stopped after its final checkpoint leaves (a resize landing as it finished): restarting it
    # would only start a process and load that checkpoint to learn there is nothing left to train.
    from glassbox.train.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from train_testlib import tiny_config as run_config

    Trainer(run_config(prepared_data, tmp_path / "done", "schedule.steps=2", "logging.val_every=0")).fit()
    ex = RayExecutor(slots=2)
    ex.submit(JobRequest("done", "tiny", tmp_path / "done", steps=2, replicas=1))
    ex.submit(JobRequest("more", "tiny", tmp_path / "done", steps=3, replicas=1))
    assert ex._trained("done") and not ex._trained("more")
    ex.apply({"done": 1})
    assert ex.finished.keys() == {"done"} and ex.history()["done"] == []


@pytest.mark.slow
def test_pollux_schedules_adaptive_jobs_from_their_agents_reports(prepared_data, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", prepared_data)
    steps = 2 * STEPS               # room for the agent to time steps and report after a resize's warm-up
    agent = ["warmup_steps=2", "decide_every=2", "max_batch=16"]
    jobs = [JobRequest(name, config, tmp_path / name, steps=steps, checkpoint_every=2, arrival=arrival,
                       adaptive=True, elastic_overrides=agent) for name, arrival in (("a", 0.0), ("b", 4.0))]
    with RayExecutor(slots=2) as ex:
        result = schedule(ex, jobs, PolluxPolicy(population=16, generations=5, seed=0), interval=3.0, timeout=600)
    assert set(result["finished"]) == {"a", "b"}
    # Never more than the cluster, and every job allocated at some round (whether b shares the cluster with a or
    # waits for it depends on how far a got by then: a shrink restarts a, which the restart penalty weighs).
    rounds = result["rounds"]
    assert all(sum(r["allocations"].values()) <= 2 for r in rounds)
    assert all(any(r["allocations"].get(job.name) for r in rounds) for job in jobs), rounds
    for job in jobs:
        done = {r["step"] for r in read_metrics(job.run_dir, required=True) if "loss" in r}
        assert sorted(done) == list(range(1, steps + 1))      # every step, across any resize
    # What the scheduler ranked allocations by: the agent's latest report as a goodput table, the agent's own
    # GoodputModel.best relative to the fair share.
    reports = [r for r in read_metrics(jobs[0].run_dir) if r.get("event") == "pollux" and r.get("throughput_params")]
    assert reports, "the agent never reported a goodput model"
    last = reports[-1]
    model = GoodputModel(ThroughputParams.from_dict(last["throughput_params"]), last["grad_sqr"], last["grad_var"],
                         last["init_batch"])
    best = [model.best(1, r, last["max_batch"], (1, last["max_micro_batch"])).goodput for r in (1, 2)]
    table = observed_speedup(jobs[0], slots=2, fair=1)
    assert table[1, 1:] == pytest.approx([b / best[0] for b in best])
