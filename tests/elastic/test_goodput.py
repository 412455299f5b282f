"""Goodput: efficiency, the best batch shape against a brute-force search, speedup, and the 5% switching rule."""

import pytest

from glassbox.elastic.goodput import GoodputModel, efficiency, noise_scale, should_switch
from glassbox.elastic.throughput import ThroughputParams
from glassbox.errors import GlassboxError

PARAMS = ThroughputParams(alpha_c=0.02, beta_c=0.002, alpha_r=0.03, beta_r=0.002, alpha_n=0.1, beta_n=0.01,
                          gamma=2.0)


def test_efficiency_is_the_pollux_formula():
    # var at M0 = 32 is 0.5, sqr 1: phi = 16 samples.
    assert noise_scale(1.0, 0.5, 32) == pytest.approx(16.0)
    assert efficiency(1.0, 0.5, 32, 32) == pytest.approx(1.0)
    assert efficiency(1.0, 0.5, 32, 128) == pytest.approx((16 + 32) / (16 + 128))
    # The gain form: r = (var + sqr) / (var / S + sqr), E = r / S.
    s = 128 / 32
    assert efficiency(1.0, 0.5, 32, 128) == pytest.approx((0.5 + 1.0) / (0.5 / s + 1.0) / s)
    assert efficiency(0.0, 0.5, 32, 4096) == 1.0     # pure noise: every sample counts fully
    with pytest.raises(GlassboxError, match="batch"):
        efficiency(1.0, 0.5, 0, 8)


def brute_force(model, nodes, replicas, max_batch, lo, hi):
    best = None
    for micro in range(lo, hi + 1):
        for accum in range(1, max_batch // (replicas * micro) + 1):
            batch = replicas * micro * accum
            if batch < model.init_batch or batch > max_batch:
                continue
            g = model.goodput(nodes, replicas, micro, accum)
            best = max(best or 0.0, g)
    return best


@pytest.mark.parametrize("grad_var", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("replicas,nodes", [(1, 1), (4, 1), (8, 2)])
def test_best_is_near_the_exhaustive_optimum(grad_var, replicas, nodes):
    model = GoodputModel(PARAMS, 1.0, grad_var, 32)
    choice = model.best(nodes, replicas, 4096, (4, 64))
    assert choice.batch == replicas * choice.micro_batch * choice.accum_steps
    assert 32 <= choice.batch <= 4096 and 4 <= choice.micro_batch <= 64
    assert choice.goodput == pytest.approx(model.goodput(nodes, replicas, choice.micro_batch, choice.accum_steps))
    # ~50 geometric candidates lose little against trying every shape.
    assert choice.goodput >= 0.97 * brute_force(model, nodes, replicas, 4096, 4, 64)


def test_noisier_gradients_choose_larger_batches():
    batches = [GoodputModel(PARAMS, 1.0, var, 32).best(1, 1, 8192, (1, 64)).batch for var in (0.01, 10.0, 1000.0)]
    assert batches[0] < batches[1] < batches[2]
    assert batches[0] == 32     # a noise-free gradient: nothing gained beyond M0


def test_speedup_is_relative_to_the_base_allocation():
    model = GoodputModel(PARAMS, 1.0, 10.0, 32)
    assert model.speedup(1, 1, 4096, (4, 64)) == pytest.approx(1.0)
    assert model.speedup(1, 4, 4096, (4, 64)) > 1.0
    assert model.speedup(1, 0, 4096, (4, 64)) == 0.0
    assert model.speedup(1, 4, 4096, (4, 64), base_replicas=4) == pytest.approx(1.0)
    # Noise-free gradients scale worse: the extra GPUs can only buy a larger, less efficient batch.
    assert GoodputModel(PARAMS, 1.0, 0.01, 32).speedup(1, 4, 4096, (4, 64)) < model.speedup(1, 4, 4096, (4, 64))


def test_switch_only_above_five_percent():
    assert not should_switch(100.0, 104.9)
    assert not should_switch(100.0, 105.0)
    assert should_switch(100.0, 105.1)
    assert not should_switch(100.0, 90.0)


def test_impossible_requests_are_refused():
    model = GoodputModel(PARAMS, 1.0, 1.0, 32)
    with pytest.raises(GlassboxError, match="no batch shape"):
        model.best(1, 16, 32, (4, 64))          # 16 replicas x 4 samples overshoot max_batch 32
    with pytest.raises(GlassboxError, match="not an allocation"):
        model.best(3, 2, 4096, (4, 64))
    with pytest.raises(GlassboxError, match="micro_batch_range"):
        model.best(1, 1, 4096, (8, 4))


def test_a_shape_that_ran_is_priced_by_its_measured_time_and_competes():
    # The fit says a pass costs 2 ms a sample; the job ran 64 in one micro-batch at 63 ms (a GPU's flat
    # small-batch region). 64 is not on the geometric grid between 32 and 2048 (63 and 69 are).
    phi = 52.0
    grad_var = phi / 32
    fitted = GoodputModel(PARAMS, 1.0, grad_var, 32)
    assert (64, 1) not in fitted.candidates(1, 2048, (1, 256))
    measured = GoodputModel(PARAMS, 1.0, grad_var, 32, measured={(1, 1, 64, 1): 0.063})
    efficiency_64 = (phi + 32) / (phi + 64)
    assert measured.goodput(1, 1, 64, 1) == pytest.approx(64 / 0.063 * efficiency_64)
    assert fitted.goodput(1, 1, 64, 1) == pytest.approx(64 / (0.02 + 0.002 * 64) * efficiency_64)
    assert fitted.best(1, 1, 2048, (1, 256)).batch != 64
    best = measured.best(1, 1, 2048, (1, 256))
    assert (best.batch, best.micro_batch, best.accum_steps) == (64, 64, 1)
    assert best.goodput == pytest.approx(measured.goodput(1, 1, 64, 1))
    # Measured elsewhere (another allocation, a micro-batch outside the range) it is no candidate.
    assert GoodputModel(PARAMS, 1.0, grad_var, 32, measured={(1, 2, 32, 1): 0.063}).best(1, 1, 2048, (1, 256)) == \
        fitted.best(1, 1, 2048, (1, 256))
    assert measured.best(1, 1, 2048, (1, 48)) == fitted.best(1, 1, 2048, (1, 48))
