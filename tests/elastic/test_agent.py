"""The Pollux agent in real training runs: decisions in metrics.jsonl, its state through a resume, exact replay."""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    # Micro-batches of one sample: a step of eight passes, so that the shapes the agent moves to (fewer passes)
    # are faster by far more than a loaded 2-core machine's timing noise (at two samples, four passes against the
    # exploring steps' two, a noisy median sometimes kept the configured shape, priced by what it ran).
    cfg = tiny_config(data, run, "schedule.steps=24", "batch.global_batch_size=8", "batch.micro_batch_size=1",
                      "checkpoint.every=12", "logging.val_every=0", *overrides)
    plan = PolluxPlan(8, 1, elastic.measure_every)
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
    # The agent adapted: it left the configured shape (8 samples in micro-batches of 1) once it could measure.
    assert {(r["batch_size"], r["micro_batch_size"]) for r in steps[12:]} != {(8, 1)}
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
    plan = PolluxPlan(8, 8)
    plan.explore = range(3, 7)      # what the agent sets at the start while it has timed one micro-batch size
    assert [plan._measured_micro(s, Shape(8, 8, 1.0, 1.0)) for s in range(1, 9)] == [8, 8, 4, 4, 4, 4, 8, 8]
    assert plan._measured_micro(4, Shape(8, 2, 1.0, 1.0)) == 2                 # accumulating already: as it is


def test_exploring_steps_run_micro_batches_twice_the_size_where_they_fit():
    agent = PolluxAgent(ElasticConfig(max_micro_batch=64, max_batch=64), PolluxPlan(32, 32))
    agent.replicas = 1
    assert agent._explore_shape(Shape(32, 32, 1.3, 1.7)) == Shape(64, 64, 1.0, 1.0)   # doubled, at one M0 step
    assert agent._explore_shape(Shape(32, 8, 1.3, 1.7)) == Shape(32, 16, 1.3, 1.7)    # same batch, fewer passes
    assert agent._explore_shape(Shape(48, 48, 1.0, 1.0)) is None                      # 96 would not fit: split
    agent.max_batch = 32
    assert agent._explore_shape(Shape(32, 32, 1.0, 1.0)) is None                      # nor past max_batch
    plan = agent.plan
    plan.explore, plan.explore_shape = range(3, 5), Shape(64, 64, 1.0, 1.0)
    specs = [plan.spec(s) for s in range(1, 7)]
    assert [(s.global_batch, s.micro_batch) for s in specs] == [(32, 32), (32, 32), (64, 64), (64, 64), (32, 32),
                                                                (32, 32)]


def test_a_chosen_single_odd_micro_batch_is_made_even_so_it_splits_in_halves():
    from glassbox.elastic.goodput import Choice

    agent = PolluxAgent(ELASTIC, PolluxPlan(8, 2, ELASTIC.measure_every))
    agent.replicas = 1
    assert agent._measurable(Choice(31, 31, 1, 1.0)) == (30, 30)
    assert agent._measurable(Choice(30, 30, 1, 1.0)) == (30, 30)
    assert agent._measurable(Choice(31, 1, 31, 1.0)) == (31, 1)             # accumulates: nothing to split
    assert agent._measurable(Choice(9, 9, 1, 1.0)) == (8, 8)
    unmeasured = PolluxAgent(ElasticConfig(measure_every=0, split_budget=0.0), PolluxPlan(8, 2))
    unmeasured.replicas = 1
    assert unmeasured._measurable(Choice(31, 31, 1, 1.0)) == (31, 31)


def test_decisions_trust_the_throughput_line_only_near_the_micro_batches_timed():
    from glassbox.elastic.goodput import GoodputModel
    from glassbox.elastic.throughput import fit_throughput

    # The H200's pass times for micro-batches of 16 and 32 (session 9's pollux_adaptive.md, 2026-12-02): nearly
    # flat, so the line through them promises far more throughput at 256 than the card gave (222.9 ms a step).
    agent = PolluxAgent(ElasticConfig(max_micro_batch=256), PolluxPlan(32, 32))
    agent.replicas, agent.nodes = 1, 1
    agent.times = {(1, 1, 16, 2): [0.1420], (1, 1, 32, 1): [0.0755]}
    model = GoodputModel(fit_throughput(agent.observations()), grad_sqr=1.0, grad_var=250 / 32, init_batch=32)
    unbounded = model.best(1, 1, 1024, (1, 256))
    assert unbounded.micro_batch > 128                                  # the extrapolation the bound exists for
    assert agent.micro_batch_range() == (1, 64)
    bounded = model.best(1, 1, 1024, agent.micro_batch_range())
    assert bounded.micro_batch <= 64 and bounded.accum_steps == 1     # accumulating a timed size never pays
    agent.times[(1, 1, 64, 1)] = [0.0940]                               # once 64 is timed, 128 is in reach
    assert agent.micro_batch_range() == (1, 128)
    assert PolluxAgent(ElasticConfig(max_micro_batch=256, max_micro_growth=0), PolluxPlan(32, 32)) \
        .micro_batch_range() == (1, 256)
    with pytest.raises(GlassboxError, match="elastic.max_micro_growth"):
        load_elastic_config(None, ["max_micro_growth=0.5"])


def test_a_shape_that_ran_is_priced_by_its_median_step_time():
    # The H200 run of session 16: 32 and 64 timed (the fit through them priced 114 at 85 ms), then 114 ran at
    # 100 ms. With phi ~52, 64's goodput beats 114's by more than the 5% a switch needs; the fit through all three
    # priced 64 at 74-87 ms and kept the run at 114.
    agent = PolluxAgent(ElasticConfig(max_micro_batch=256), PolluxPlan(32, 32))
    agent.replicas, agent.nodes = 1, 1
    agent.times = {(1, 1, 32, 1): [0.065, 0.064, 0.066], (1, 1, 64, 1): [0.0716, 0.0711, 0.0721, 0.306],
                   (1, 1, 114, 1): [0.0996, 0.0997, 0.0998, 0.1003, 0.231], (1, 1, 16, 2): [0.12, 0.13]}
    for _ in range(4):
        agent.record_estimate(1, "triple", grad_sqr=1.0, trace=52.0, samples=32)
    model = agent.goodput_model()
    assert model.measured == {(1, 1, 32, 1): 0.065, (1, 1, 64, 1): pytest.approx(0.07185),
                              (1, 1, 114, 1): 0.0998}          # two step times are too few to price a shape
    best = model.best(1, 1, agent.max_batch, agent.micro_batch_range())
    assert best.batch == 64
    assert best.goodput > 1.05 * model.goodput(1, 1, 114, 1)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (item/float/bool of a tensor, a copy off the device):
    on a GPU each waits for everything queued before it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        to_host = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and source is not None \
            and source.device.type != "cpu" and (kwargs.get("device") == torch.device("cpu")
                                                 or func is torch.ops.aten.copy_.default and args[0].is_cpu)
        if func is torch.ops.aten._local_scalar_dense.default or to_host:
            self.count += 1
        return func(*args, **kwargs)


def count_host_reads(agent: PolluxAgent, hooks: tuple[str, ...]) -> dict[str, list[int]]:
    """Wraps the agent's hooks: per hook, the host reads each call made."""
    counts: dict[str, list[int]] = {h: [] for h in hooks}
    for hook in hooks:
        inner = getattr(agent, hook)

        def counted(*args, _inner=inner, _hook=hook):
            with HostReads() as reads:
                _inner(*args)
            counts[_hook].append(reads.count)
        setattr(agent, hook, counted)
    return counts


def test_agent_reads_nothing_while_a_step_is_queued_and_decides_every_n_steps(prepared_data, tmp_path):
    # One micro-batch per step and no split budget: the noise scale comes from consecutive-step triples, no step
    # is split, and the hooks that run while a step is being queued (the device busy with the one before) read no
    # device value: on a GPU every read there stalls the queue (a float() of fused AdamW's step count did).
    elastic = ElasticConfig(decide_every=5, warmup_steps=5, max_micro_batch=32, max_batch=32, precondition_every=3,
                            explore_steps=0, split_budget=0.0)
    cfg = tiny_config(prepared_data, tmp_path / "run", "schedule.steps=20", "batch.global_batch_size=8",
                      "batch.micro_batch_size=8", "logging.val_every=0", "checkpoint.save_final=false")
    plan = PolluxPlan(8, 8, elastic.measure_every)
    agent = PolluxAgent(elastic, plan)
    reads = count_host_reads(agent, ("on_step_start", "on_after_backward", "on_step_end"))
    Trainer(cfg, callbacks=[agent], plan=plan).fit()
    assert len(reads["on_after_backward"]) == 20
    assert sum(reads["on_step_start"]) == 0 and sum(reads["on_after_backward"]) == 0
    assert max(reads["on_step_end"]) <= 1
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert all(r["micro_batch_size"] == r["batch_size"] for r in steps)     # nothing split to measure
    # Consecutive steps of one batch size make triples, without overlapping, from step 1 on.
    triples, run = 0, None
    for r in steps:
        if run is not None and run[0] + run[2] == r["step"] and run[1] == r["batch_size"]:
            run = (run[0], run[1], run[2] + 1)
            if run[2] == 3:
                triples, run = triples + 1, None
        else:
            run = (r["step"], r["batch_size"], 1)
    assert agent.ema.count == triples >= 5
    assert [r["step"] for r in rows if r.get("event") == "pollux"] == [5, 10, 15, 20]


def test_split_steps_keep_within_their_budget_of_the_step_time(prepared_data, tmp_path):
    # The default measurement: a step of one micro-batch split in halves, every other step until the first
    # decision, then as often as keeps the extra pass within split_budget of a step, priced by the step times
    # seen (whole and split) once each shape has a few and they say a split costs more, by the throughput fit
    # otherwise.
    import math

    from glassbox.elastic.throughput import ThroughputParams, predict_step_time

    elastic = ElasticConfig(decide_every=5, warmup_steps=8, max_micro_batch=8, max_batch=8, explore_steps=0,
                            adapt_batch=False, split_budget=0.01)
    cfg = tiny_config(prepared_data, tmp_path / "run", "schedule.steps=30", "batch.global_batch_size=8",
                      "batch.micro_batch_size=8", "logging.val_every=0", "checkpoint.save_final=false")
    plan = PolluxPlan(8, 8)
    agent = PolluxAgent(elastic, plan)
    Trainer(cfg, callbacks=[agent], plan=plan).fit()
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    split = [r["step"] for r in steps if r["micro_batch_size"] == 4]
    decisions = [r for r in rows if r.get("event") == "pollux"]
    assert [s for s in split if s <= 11] == [2, 4, 6, 8, 10]      # before the first decision: every other step
    priced_by_times = 0
    for d in decisions:
        seen = {m: [r["step_time"] for r in steps if r["micro_batch_size"] == m and 2 < r["step"] <= d["step"]
                    and "val_loss" not in r][-32:] for m in (8, 4)}      # the last step validates: not timed
        params = ThroughputParams.from_dict(d["throughput_params"])
        whole, halves = predict_step_time(params, 1, 1, 8, 1), predict_step_time(params, 1, 1, 4, 2)
        if all(len(t) >= 3 for t in seen.values()) and statistics.median(seen[4]) > statistics.median(seen[8]):
            whole, halves = statistics.median(seen[8]), statistics.median(seen[4])   # a split seen to cost more
            priced_by_times += 1
        assert d["measure_every"] == max(2, math.ceil(max(halves - whole, 0.0) / (0.01 * whole)))
    assert priced_by_times >= 1
    # Each decision's interval holds for the steps it shapes (a decision after step t shapes t + 2 on).
    for d, following in zip(decisions, decisions[1:] + [{"step": 30}]):
        shaped = [r["step"] for r in steps if d["step"] + 2 <= r["step"] <= following["step"] + 1]
        assert [s for s in split if s in shaped] == [s for s in shaped if s % d["measure_every"] == 0]
    assert agent.split_ema.count == len(split)                 # every split step is a measurement
    assert agent.plan.state_dict()["measure_every"] == decisions[-1]["measure_every"]


def test_decisions_use_the_triples_until_the_split_estimate_is_precise_then_the_splits_for_good():
    agent = PolluxAgent(ElasticConfig(split_precision=0.5), PolluxPlan(8, 8))
    assert agent.ema is agent.split_ema                         # nothing measured yet: the split one as it stands
    agent.record_estimate(1, "triple", 1.0, 500.0, samples=24)
    for step, sqr in enumerate((-20.0, 25.0, -15.0, 30.0), start=2):   # a small difference of large norms: noise
        agent.record_estimate(step, "split", sqr, 50.0, samples=8)
    assert agent.split_ema.grad_sqr_rel_error > 0.5 and not agent.split_trusted
    assert agent.ema is agent.triple_ema and agent.ema.noise_scale == pytest.approx(500.0)
    for step, sqr in enumerate((10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 10.2, 9.8) * 4, start=6):   # now precise
        agent.record_estimate(step, "split", sqr, 50.0, samples=8)
    assert agent.split_ema.grad_sqr_rel_error <= 0.5 and agent.split_trusted and agent.ema is agent.split_ema
    for step, sqr in enumerate((-90.0, 110.0, -80.0, 100.0), start=40):   # noisy again: the choice stays
        agent.record_estimate(step, "split", sqr, 50.0, samples=8)
    assert agent.split_ema.grad_sqr_rel_error > 0.5 and agent.ema is agent.split_ema
    resumed = PolluxAgent(ElasticConfig(split_precision=0.5), PolluxPlan(8, 8))
    resumed.load_state_dict(agent.state_dict())
    assert resumed.split_trusted and resumed.ema is resumed.split_ema
    few = PolluxAgent(ElasticConfig(split_precision=0.5), PolluxPlan(8, 8))
    for step, sqr in enumerate((10.0, 10.1, 9.9, 10.0, 10.1, 9.9, 10.0), start=1):   # precise, but only 7 of them
        few.record_estimate(step, "split", sqr, 50.0, samples=8)
    assert few.split_ema.grad_sqr_rel_error < 0.01 and not few.split_trusted
    few.record_estimate(8, "split", 10.0, 50.0, samples=8)
    assert few.split_trusted


def test_a_checkpoint_from_before_split_steps_resumes_with_its_triples_estimate():
    old = PolluxAgent(ElasticConfig(split_budget=0.0), PolluxPlan(8, 8))
    for trace in (40.0, 60.0):
        old.triple_ema.update(1.0, trace, batch=24)
    state = old.state_dict()
    state["ema"] = state.pop("triple_ema")
    del state["split_ema"]
    resumed = PolluxAgent(ElasticConfig(), PolluxPlan(8, 8))
    resumed.load_state_dict(state)
    assert resumed.split_ema.count == 0 and resumed.ema is resumed.triple_ema
    assert resumed.ema.noise_scale == pytest.approx(old.triple_ema.noise_scale)


@pytest.mark.gpu
def test_agent_hooks_never_sync_the_gpu(prepared_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # Split every other step (within the default 3% budget a split step of this tiny model, ~2 steps' time on a
    # GPU, would come once in 34): the measuring path runs often under the strict mode.
    elastic = ElasticConfig(decide_every=5, warmup_steps=5, max_micro_batch=16, max_batch=32, precondition_every=3,
                            measure_every=2)
    cfg = tiny_config(prepared_data, tmp_path / "run", "schedule.steps=20", "batch.global_batch_size=8",
                      "batch.micro_batch_size=8", "logging.val_every=0", "checkpoint.save_final=false",
                      "parallel.device=cuda")
    plan = PolluxPlan(8, 8, elastic.measure_every)
    agent = PolluxAgent(elastic, plan)
    for hook in ("on_step_start", "on_after_backward"):
        inner = getattr(agent, hook)

        def strict(*args, _inner=inner):
            torch.cuda.set_sync_debug_mode("error")
            try:
                _inner(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        setattr(agent, hook, strict)
    Trainer(cfg, callbacks=[agent], plan=plan).fit()
    assert agent.ema.count >= 5      # one per split step, but for those the exploring steps (6-9) run whole
