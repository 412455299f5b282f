"""The throughput model: the fit recovers known parameters, priors cover unseen allocations, bad input is named."""

import math

import numpy as np
import pytest

from glassbox.elastic.throughput import (
    StepObservation,
    ThroughputParams,
    fit_throughput,
    predict_step_time,
    predict_step_times,
    probe_max_micro_batch,
)
from glassbox.errors import GlassboxError

TRUE = ThroughputParams(alpha_c=0.05, beta_c=0.004, alpha_r=0.03, beta_r=0.002, alpha_n=0.12, beta_n=0.01,
                        gamma=3.0)


def observe(params, configs, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [StepObservation(n, k, m, a, predict_step_time(params, n, k, m, a) * math.exp(noise * rng.standard_normal()))
            for n, k, m, a in configs]


def test_model_matches_the_formula():
    t_grad = 0.05 + 0.004 * 16
    t_sync = 0.12 + 0.01 * 2          # 4 replicas over 2 nodes
    t_opt = (t_grad ** 3 + t_sync ** 3) ** (1 / 3)
    assert predict_step_time(TRUE, 2, 4, 16, 3) == pytest.approx(2 * t_grad + t_opt)
    assert predict_step_time(TRUE, 1, 1, 16, 1) == pytest.approx(t_grad)     # one replica: no sync


def test_vectorized_prediction_is_the_scalar_one_per_element():
    nodes, replicas, micro, accum = [1, 1, 2, 4], [1, 3, 4, 16], [8, 16, 32, 64], [1, 2, 1, 3]
    times = predict_step_times(TRUE, nodes, replicas, micro, accum)
    assert times.shape == (4,)
    for t, args in zip(times, zip(nodes, replicas, micro, accum)):
        assert t == predict_step_time(TRUE, *args)
    assert predict_step_times(TRUE, 1, 1, np.array([4, 8]), 1).tolist() == [
        predict_step_time(TRUE, 1, 1, 4, 1), predict_step_time(TRUE, 1, 1, 8, 1)]


def test_fit_recovers_known_parameters():
    configs = [(n, k, m, a) for n, k in [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 16)]
               for m in (4, 16, 64) for a in (1, 2)]
    fitted = fit_throughput(observe(TRUE, configs, noise=0.005))
    for name, true in TRUE.to_dict().items():
        assert getattr(fitted, name) == pytest.approx(true, rel=0.25), name
    for n, k, m, a in [(1, 8, 32, 1), (8, 32, 8, 4)]:   # unseen allocations, predicted from the fit
        assert predict_step_time(fitted, n, k, m, a) == pytest.approx(predict_step_time(TRUE, n, k, m, a), rel=0.05)


def test_priors_fill_in_what_one_gpu_cannot_show():
    # A job seen only on one GPU: compute is fitted, sync comes from the priors, and more GPUs never look free.
    fitted = fit_throughput(observe(TRUE, [(1, 1, m, 1) for m in (4, 8, 16, 32)]))
    assert fitted.alpha_c == pytest.approx(TRUE.alpha_c, rel=0.1)
    assert fitted.beta_c == pytest.approx(TRUE.beta_c, rel=0.1)
    one = predict_step_time(fitted, 1, 1, 16, 1)
    assert predict_step_time(fitted, 1, 2, 16, 1) > one
    assert predict_step_time(fitted, 2, 4, 16, 1) > predict_step_time(fitted, 1, 4, 16, 1)
    priors = ThroughputParams(0.01, 0.001, 0.5, 0.05, 2.0, 0.2, 1.0)
    with_priors = fit_throughput(observe(TRUE, [(1, 1, m, 1) for m in (4, 8, 16, 32)]), priors)
    assert with_priors.alpha_n == pytest.approx(2.0, rel=0.05)   # unseen: the given prior holds


def test_bad_observations_are_named():
    with pytest.raises(GlassboxError, match="observation 1"):
        fit_throughput([StepObservation(1, 1, 4, 1, 0.1), StepObservation(2, 1, 4, 1, 0.1)])
    with pytest.raises(GlassboxError, match="step_time"):
        fit_throughput([StepObservation(1, 1, 4, 1, float("nan"))])
    with pytest.raises(GlassboxError, match="no step observations"):
        fit_throughput([])


def test_probe_finds_the_largest_micro_batch_that_fits():
    tried = []

    def fits(m):
        tried.append(m)
        return m <= 37

    assert probe_max_micro_batch(fits, 4, 1024) == 37
    assert len(tried) <= 12
    assert probe_max_micro_batch(lambda m: m <= 37, 64, 1024) == 37
    assert probe_max_micro_batch(lambda m: True, 4, 100) == 100
    with pytest.raises(GlassboxError, match="not even"):
        probe_max_micro_batch(lambda m: False, 4, 100)


def test_probe_at_a_resolution_stops_early_below_the_wall():
    tried = []

    def fits(m):
        tried.append(m)
        return m <= 1500

    found = probe_max_micro_batch(fits, 32, 4096, resolution=0.125)
    assert len(tried) <= 10                 # 32 -> 2048 doubling (7), then three halvings of 1024..2048
    assert 1500 / 1.125 <= found <= 1500
    with pytest.raises(GlassboxError, match="resolution"):
        probe_max_micro_batch(fits, 32, 4096, resolution=1.0)


def test_a_warm_started_refit_finds_the_cold_fit():
    configs = [(1, 1, m, a) for m in (4, 16, 64) for a in (1, 2)] + [(1, 2, 16, 1), (1, 4, 16, 1)]
    obs = observe(TRUE, configs, noise=0.01, seed=3)
    cold = fit_throughput(obs)
    warm = fit_throughput(obs, start=fit_throughput(obs[:-2]))
    for name, value in cold.to_dict().items():
        assert getattr(warm, name) == pytest.approx(value, rel=0.02), name
