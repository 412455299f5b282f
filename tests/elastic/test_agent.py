"""The Pollux agent in real training runs: decisions in metrics.jsonl, its state through a resume, exact replay."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_testlib import tiny_config  # noqa: E402

from glassbox.data.order_log import DataOrderLog  # noqa: E402
from glassbox.elastic.agent import PolluxAgent, PolluxPlan, Shape  # noqa: E402
from glassbox.elastic.config import ElasticConfig, load_elastic_config  # noqa: E402
from glassbox.errors import GlassboxError  # noqa: E402
from glassbox.train.metrics_log import read_metrics  # noqa: E402
from glassbox.train.trainer import Trainer, default_callbacks  # noqa: E402

torch.set_num_threads(1)
ELASTIC = ElasticConfig(decide_every=4, warmup_steps=4, max_micro_batch=8, max_batch=32, measure_every=2)


def pollux_trainer(data: Path, run: Path, *overrides: str, elastic: ElasticConfig = ELASTIC) -> Trainer:
    cfg = tiny_config(data, run, "schedule.steps=24", "batch.global_batch_size=8", "batch.micro_batch_size=2",
                      "checkpoint.every=12", "logging.val_every=0", *overrides)
    plan = PolluxPlan(8, 2, elastic.measure_every)
    return Trainer(cfg, callbacks=default_callbacks(cfg) + [PolluxAgent(elastic, plan)], plan=plan)


@pytest.fixture(scope="module")
def adaptive_run(prepared_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pollux") / "run"
    pollux_trainer(prepared_data, run).fit()
    return run


def test_every_decision_is_a_metrics_row(adaptive_run):
    rows = read_metrics(adaptive_run)
    steps = [r for r in rows if "loss" in r]
    decisions = [r for r in rows if r.get("event") == "pollux"]
    assert [d["step"] for d in decisions] == [4, 8, 12, 16, 20, 24]
    last = decisions[-1]
    for key in ("batch", "micro_batch", "accum_steps", "lr_scale", "noise_scale", "grad_sqr", "grad_var",
                "throughput_params", "predicted_goodput", "best", "efficiency"):
        assert key in last, key
    assert last["noise_scale"] > 0 and set(last["throughput_params"]) >= {"alpha_c", "beta_c", "gamma"}
    # The agent adapted: it left the configured shape (8 samples in micro-batches of 2) once it could measure.
    assert {(r["batch_size"], r["micro_batch_size"]) for r in steps[12:]} != {(8, 2)}
    assert any(d["switched"] for d in decisions)
    # Progress is efficiency-weighted: at most the samples seen, more than the steps at M0 would have made.
    assert steps[-1]["progress"] <= steps[-1]["samples"] + 1e-6
    # The data order is the cursor: each step starts where the previous ended, whatever its size.
    log = DataOrderLog(adaptive_run, read_only=True)
    for a, b in zip(range(1, 24), range(2, 25)):
        ra, rb = log.row(a), log.row(b)
        assert rb["cursor_start"] == ra["cursor_start"] + ra["batch_size"]
        assert ra["batch_size"] == steps[a - 1]["batch_size"]


def test_adaptive_run_replays_bit_exact(adaptive_run):
    from glassbox.release.reproduce import from_run, reproduce

    result = reproduce(from_run(adaptive_run), 24)
    assert result.bit_exact, result


def test_agent_state_survives_a_resume(prepared_data, adaptive_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adaptive_run, run)
    checkpoint = run / "checkpoints" / "step_000012"
    saved = torch.load(checkpoint / "train_state.pt", weights_only=False)
    trainer = pollux_trainer(prepared_data, run, f"checkpoint.resume={checkpoint}")
    agent = next(cb for cb in trainer.callbacks if isinstance(cb, PolluxAgent))
    trainer.dispatch("on_train_start")
    assert agent.state_dict() == saved["stateful"]["callback.pollux"]
    assert trainer.state.step_plan.state_dict() == saved["stateful"]["step_plan"]
    # Step 13 was asked for (prefetched) before the checkpoint: the resumed run takes exactly that step.
    logged = {r["step"]: r for r in read_metrics(adaptive_run) if "loss" in r}
    row = trainer.train_step()
    assert (row["batch_size"], row["micro_batch_size"], row["lr"], row["loss"]) == (
        logged[13]["batch_size"], logged[13]["micro_batch_size"], logged[13]["lr"], logged[13]["loss"])


def test_agent_refuses_a_plan_it_does_not_own(prepared_data, tmp_path):
    cfg = tiny_config(prepared_data, tmp_path / "r")
    with pytest.raises(GlassboxError, match="step plan"):
        Trainer(cfg, callbacks=[PolluxAgent(ELASTIC, PolluxPlan(8, 4))])


def test_config_names_bad_fields(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("elastic:\n  decide_every: 3\n")
    assert load_elastic_config(path, ["max_batch=128"]).decide_every == 3
    with pytest.raises(GlassboxError, match="elastic.decide_every"):
        load_elastic_config(None, ["decide_every=0"])
    with pytest.raises(GlassboxError, match="unknown config key elastic.nope"):
        load_elastic_config(None, ["nope=1"])


def test_a_measured_step_is_split_in_a_few_micro_batches_never_one_sample_each():
    plan = PolluxPlan(8, 8, measure_every=4)
    split = {batch: plan._measured_micro(4, Shape(batch, batch, 1.0, 1.0)) for batch in (8, 12, 9, 31, 25)}
    assert split == {8: 4, 12: 6, 9: 3, 31: 31, 25: 25}     # halves, thirds; a prime (or 5 x 5) is not split
    assert plan._measured_micro(5, Shape(8, 8, 1.0, 1.0)) == 8                 # only every measure_every steps


def test_a_chosen_single_odd_micro_batch_is_made_even_so_it_splits_in_halves():
    from glassbox.elastic.goodput import Choice

    agent = PolluxAgent(ELASTIC, PolluxPlan(8, 2, ELASTIC.measure_every))
    agent.replicas = 1
    assert agent._measurable(Choice(31, 31, 1, 1.0)) == (30, 30)
    assert agent._measurable(Choice(30, 30, 1, 1.0)) == (30, 30)
    assert agent._measurable(Choice(31, 1, 31, 1.0)) == (31, 1)             # accumulates: nothing to split
    assert agent._measurable(Choice(9, 9, 1, 1.0)) == (8, 8)
    unmeasured = PolluxAgent(ElasticConfig(measure_every=0), PolluxPlan(8, 2))
    unmeasured.replicas = 1
    assert unmeasured._measurable(Choice(31, 31, 1, 1.0)) == (31, 31)
