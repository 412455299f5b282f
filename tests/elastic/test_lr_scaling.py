"""LR scaling: AdaScale's gain, the square-root rule for Adam, and efficiency-weighted progress driving the schedule."""

import math

import pytest

from glassbox.elastic.goodput import efficiency
from glassbox.elastic.lr_scaling import gain, lr_scale, progress_of_step
from glassbox.errors import GlassboxError
from glassbox.train.lr_schedule import LRSchedule, WarmupDecay


def test_gain_spans_one_to_the_batch_ratio():
    assert gain(1.0, 0.0, 32, 256) == pytest.approx(1.0)            # noise-free: a bigger batch buys nothing
    assert gain(1e-12, 1.0, 32, 256) == pytest.approx(8.0, rel=1e-6)  # pure noise: 8x the batch, 8x the progress
    r = gain(1.0, 1.0, 32, 128)
    assert r == pytest.approx(2.0 / (0.25 + 1.0))
    assert 1.0 < r < 4.0
    assert gain(0.0, 1.0, 32, 128) == 1.0      # no estimate yet: no scaling
    assert gain(1.0, 1.0, 32, 32) == pytest.approx(1.0)


def test_progress_is_samples_times_efficiency():
    for batch in (32, 64, 512):
        r = gain(1.0, 0.7, 32, batch)
        assert progress_of_step(32, r) == pytest.approx(batch * efficiency(1.0, 0.7, 32, batch))


def test_adam_takes_the_square_root_sgd_the_gain():
    assert lr_scale("sgd", 4.0) == 4.0
    assert lr_scale("adam", 4.0) == 2.0
    with pytest.raises(GlassboxError, match="unknown optimizer"):
        lr_scale("lion", 4.0)


def test_the_schedule_moves_by_weighted_progress():
    # Warmup 10 base steps of 32: a run at batch 128 with gain 2 warms up in 5 steps, not 10 nor 2.5.
    schedule = LRSchedule(1e-3, WarmupDecay(100, 10, "cosine", 0.1), samples_per_step=32)
    r = gain(1.0, 2.0, 32, 128)
    assert r == pytest.approx(2.0)
    progress, lrs = 0.0, []
    for _ in range(6):
        lrs.append(schedule.lr(progress) * lr_scale("adam", r))
        progress += progress_of_step(32, r)
    peak = 1e-3 * math.sqrt(2.0)
    assert lrs[4] == pytest.approx(peak * 9 / 10)     # progress 9 base steps: the last warmup step
    assert lrs[5] == pytest.approx(peak)               # progress 10 base steps: warmup done, decay starts
