"""The seams features plug into: a step plan from code replayed exactly, callbacks with state and gradient stats."""

from __future__ import annotations

import torch

from glassbox.release.reproduce import from_run, reproduce
from glassbox.train.callbacks import Callback, GradientStats
from glassbox.train.step_plan import StepPlan
from glassbox.train.trainer import Trainer
from train_testlib import tiny_config

torch.set_num_threads(1)


class ChangingPlan(StepPlan):
    """Looks adaptive: batch, micro-batch and LR scale change every two steps; progress weights samples."""

    def _shape(self, step: int) -> tuple[int, int, float]:
        size = [8, 16, 4][(step - 1) // 2 % 3]
        return size, [4, 8, 2][(step - 1) // 2 % 3], size / 8 * 0.75

    def advance(self, spec) -> None:
        self.progress = spec.progress + 0.5 * spec.global_batch


def test_an_adaptive_plan_is_replayed_bit_exactly_from_the_log(prepared_data, tmp_path):
    cfg = tiny_config(prepared_data, tmp_path / "run", "schedule.steps=8", "checkpoint.every=3")
    trainer = Trainer(cfg, plan=ChangingPlan(8, 4))
    trainer.fit()
    from glassbox.train.metrics_log import read_metrics

    rows = read_metrics(tmp_path / "run")
    assert [r["batch_size"] for r in rows] == [8, 8, 16, 16, 4, 4, 8, 8]
    assert [r["micro_batch_size"] for r in rows][:6] == [4, 4, 8, 8, 2, 2]
    for step in (3, 6):
        result = reproduce(from_run(tmp_path / "run"), step)
        assert result.bit_exact, result


class StepCounter(Callback):
    """State of its own (saved in checkpoints), and the gradient statistics of every step."""

    wants_local_norms = True

    def __init__(self):
        self.seen = 0
        self.stats: list[GradientStats] = []
        self.resumed_from = None

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]

    def on_after_backward(self, state, grads: GradientStats) -> None:
        self.stats.append(grads)

    def on_step_end(self, state) -> None:
        self.seen += 1

    def on_resume(self, state, path) -> None:
        self.resumed_from = path


def _with(callback, cfg):
    from glassbox.train.trainer import default_callbacks

    return Trainer(cfg, callbacks=default_callbacks(cfg) + [callback])


def test_a_callbacks_state_survives_resume_and_it_sees_gradient_norms(prepared_data, tmp_path):
    first = StepCounter()
    trainer = _with(first, tiny_config(prepared_data, tmp_path, "checkpoint.every=2", "schedule.steps=4"))
    trainer.fit()
    assert first.seen == 4
    grads = first.stats[0]
    assert (grads.micro_batch, grads.global_batch, len(grads.local_sq_norms)) == (4, 8, 1)
    assert 0 < grads.local_sq_norms[0].item() and 0 < grads.sq_norm.item()
    from glassbox.train.metrics_log import read_metrics

    assert grads.sq_norm.sqrt().item() == read_metrics(tmp_path)[0]["grad_norm"]

    second = StepCounter()
    resumed = _with(second, tiny_config(prepared_data, tmp_path, "checkpoint.every=2", "schedule.steps=6",
                                        "checkpoint.resume=auto"))
    resumed.fit()
    assert second.resumed_from is not None and second.resumed_from.name == "step_000004"
    assert second.seen == 6                      # 4 restored from the checkpoint, then 2 more


def test_a_plan_registered_by_name_is_chosen_from_the_config(prepared_data, tmp_path):
    import pytest

    from glassbox.config import ConfigError
    from glassbox.train.step_plan import PLANS, build_step_plan, register_plan

    register_plan("changing-test", lambda batch: ChangingPlan(batch.global_batch_size, batch.micro_batch_size))
    try:
        cfg = tiny_config(prepared_data, tmp_path, "batch.plan=changing-test")
        assert isinstance(build_step_plan(cfg.batch), ChangingPlan)
        assert type(build_step_plan(tiny_config(prepared_data, tmp_path).batch)) is StepPlan
        with pytest.raises(ConfigError, match="batch.plan: unknown step plan 'nope'"):
            build_step_plan(tiny_config(prepared_data, tmp_path, "batch.plan=nope").batch)
    finally:
        del PLANS["changing-test"]


def test_batches_that_do_not_split_are_refused_where_the_world_is_known(prepared_data, tmp_path):
    import pytest

    from glassbox.config import ConfigError
    from glassbox.errors import GlassboxError
    from glassbox.train.trainer import check_batch_split

    check_batch_split(tiny_config(prepared_data, tmp_path, "batch.global_batch_size=16"), 2)     # 8 per rank
    with pytest.raises(ConfigError, match=r"batch.global_batch_size \(16\) must divide by the 3 data-parallel"):
        check_batch_split(tiny_config(prepared_data, tmp_path, "batch.global_batch_size=16"), 3)
    with pytest.raises(ConfigError, match=r"is 6 samples per rank over 2 .* batch.micro_batch_size \(4\) does not"):
        check_batch_split(tiny_config(prepared_data, tmp_path, "batch.global_batch_size=12"), 2)
    with pytest.raises(ConfigError, match=r"logging.val_samples \(4096\) exceeds the \d+ samples of the valid"):
        Trainer(tiny_config(prepared_data, tmp_path, "logging.val_samples=4096"), callbacks=[])

    class Uneven(StepPlan):
        def _shape(self, step):
            return 8, 3, 1.0

    with pytest.raises(GlassboxError, match="step 1: micro-batch 3 does not divide the 8 samples per rank"):
        Trainer(tiny_config(prepared_data, tmp_path), callbacks=[], plan=Uneven(8, 3)).train_step()
