"""An LLM job type measured by real glassbox runs, loaded as a trace and scheduled in the simulator."""

from __future__ import annotations

import json

import pytest
import yaml

from glassbox.elastic.sched.llm_jobs import measure_llm_trace
from glassbox.elastic.sched.pollux import PolluxPolicy
from glassbox.elastic.sched.simulator import simulate
from glassbox.elastic.sched.tiresias import TiresiasPolicy
from glassbox.elastic.sched.traces import load_model_trace
from glassbox.elastic.sched.workload import Cluster, read_workload


@pytest.mark.slow
def test_measured_llm_trace_runs_in_the_simulator(prepared_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128, "max_seq_len": 64},
        "data": {"path": str(prepared_data), "seq_len": 64, "seed": 7},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3}, "schedule": {"steps": 4, "warmup_steps": 1},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 16, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(tmp_path / "unused")}))
    out = measure_llm_trace(str(config), prepared_data, tmp_path / "llm", init_batch=8, max_batch=32,
                            local_batches=(2, 8), world_sizes=(1,), steps=4, epochs=3, steps_per_epoch=2)
    trace = load_model_trace(out)
    provenance = json.loads((out / "provenance.json").read_text())
    assert [m["local_batch"] for m in provenance["measurements"]] == [2, 8]
    assert all(m["step_time"] > 0 for m in provenance["measurements"])
    assert trace.max_epochs == 3 and trace.init_batch_size == 8 and trace.max_batch_size == 32
    sqr, var = trace.grad_stats(8, 0)
    assert sqr > 0 and var >= 0                      # a real noise estimate, in AdaptDL's convention
    (tmp_path / "w.csv").write_text("name,time,application,num_replicas,batch_size\n"
                                    "x,0,llm,1,8\ny,30,llm,2,16\n")
    jobs = read_workload(tmp_path / "w.csv")
    for policy in (TiresiasPolicy(), PolluxPolicy(population=16, generations=5)):
        result = simulate(jobs, {"llm": trace}, policy, Cluster(1, 4))
        assert set(result.jct) == {"x", "y"} and min(result.jct.values()) > 0
