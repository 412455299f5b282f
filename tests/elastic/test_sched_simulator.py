"""The simulator against a workload checked by hand, and the artifact's Tiresias figure on a real workload."""

from __future__ import annotations

from pathlib import Path

import pytest

from glassbox.elastic.sched.fifo import FifoPolicy
from glassbox.elastic.sched.pollux import PolluxPolicy
from glassbox.elastic.sched.simulator import simulate
from glassbox.elastic.sched.tiresias import TiresiasPolicy
from glassbox.elastic.sched.traces import load_model_trace
from glassbox.elastic.sched.workload import Cluster, read_workload

from sched_testlib import write_toy_trace

ARTIFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "pollux-osdi21"


@pytest.fixture
def toy(tmp_path):
    traces = {"toy": load_model_trace(write_toy_trace(tmp_path))}
    workload = tmp_path / "w.csv"
    workload.write_text("name,time,application,num_replicas,batch_size\na,0,toy,1,10\nb,0,toy,2,20\n")
    return traces, read_workload(workload)


@pytest.mark.parametrize("policy", [FifoPolicy, TiresiasPolicy])
def test_hand_checked_workload(toy, policy):
    """One node of 2 GPUs; a (1 GPU, batch 10) and b (2 GPUs, batch 20) both arrive at t=0.
    Round t=60: a starts (b does not fit beside it); a pauses 30 s (restart delay), then makes 1 unit/s
    (1.0 s steps, gain 1 as grad_var is 0) through 200 units: done at 60 + 30 + 200 = 290.
    Round t=300: b starts, pauses to 330, its 2-GPU steps also take 1.0 s: done at 530.
    Mean JCT (290 + 530) / 2 = 410 s."""
    traces, jobs = toy
    result = simulate(jobs, traces, policy(), Cluster(num_nodes=1, gpus_per_node=2))
    assert result.jct == {"a": 290.0, "b": 530.0}
    assert result.mean_jct == 410.0
    assert result.restarts == {"a": 0, "b": 0}


def test_pollux_finishes_the_toy_workload_sooner(toy):
    """Pollux does not wait for b's request: a's batch gains nothing from more GPUs (noise-free gradients), so
    both jobs run at once on one GPU each, and the mean JCT beats the fixed-request 410 s."""
    traces, jobs = toy
    result = simulate(jobs, traces, PolluxPolicy(population=16, generations=10), Cluster(1, 2))
    assert result.jct["a"] <= 290.0 and result.jct["b"] < 530.0


@pytest.mark.skipif(not (ARTIFACT / "traces").is_dir(), reason="the Pollux artifact's data is not on this machine")
def test_tiresias_matches_the_artifact_on_workload_6():
    """A fixed-request policy has no randomness: our simulator reproduces the artifact's Tiresias mean JCT on
    workload 6 (results-jobload/tiresias-1.0: 3469.69375 s) to the second."""
    from glassbox.elastic.sched.traces import load_artifact_traces

    traces = load_artifact_traces(ARTIFACT / "traces")
    result = simulate(read_workload(ARTIFACT / "workloads" / "workload-6.csv"), traces, TiresiasPolicy(), Cluster())
    assert result.mean_jct == pytest.approx(3469.69375, abs=1.0)
