"""Gradient noise scale: the two-batch estimators and the meter on a synthetic problem whose noise scale is known."""

import math

import pytest
import torch

from glassbox.elastic.gns import GradientNoiseMeter, NoiseScaleEMA, estimate_from_pairs, two_batch_estimates
from glassbox.errors import GlassboxError
from glassbox.train.parallel import local_grad_sq_norms

torch.set_num_threads(1)


def test_estimators_are_unbiased_on_exact_expectations():
    # E|g_B|^2 = |G|^2 + tr(Sigma) / B exactly: the estimators return the true values.
    sqr, trace = 2.0, 64.0
    e = lambda b: sqr + trace / b
    assert two_batch_estimates(8, e(8), 128, e(128)) == pytest.approx((sqr, trace))
    with pytest.raises(GlassboxError, match="B_small < B_big"):
        two_batch_estimates(8, 1.0, 8, 1.0)


def test_ema_recovers_a_known_noise_scale_from_sampled_gradients():
    gen = torch.Generator().manual_seed(0)
    dim, sigma = 64, 0.5
    true_g = torch.full((dim,), 0.1)                 # |G|^2 = 0.64, tr(Sigma) = 64 * 0.25 = 16: phi = 25
    ema = NoiseScaleEMA(init_batch=32, smoothing=0.99)
    for _ in range(400):
        per_sample = true_g + sigma * torch.randn(64, dim, generator=gen)
        small, big = per_sample[:8].mean(0), per_sample.mean(0)
        ema.update(*two_batch_estimates(8, small.square().sum().item(), 64, big.square().sum().item()), batch=64)
    assert ema.noise_scale == pytest.approx(25.0, rel=0.15)
    assert ema.grad_var == pytest.approx(16.0 / 32, rel=0.15)
    restored = NoiseScaleEMA(32, 0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.noise_scale == ema.noise_scale


def test_bias_correction_makes_the_first_estimate_the_estimate():
    ema = NoiseScaleEMA(init_batch=16, smoothing=0.9)
    assert not ema.ready and math.isnan(ema.noise_scale)
    ema.update(2.0, 30.0, batch=16)
    assert (ema.grad_sqr, ema.trace, ema.noise_scale) == pytest.approx((2.0, 30.0, 15.0))
    ema.update(float("nan"), 1.0, batch=16)            # ignored, not averaged in
    assert ema.count == 1


class Linear(torch.nn.Module):
    """loss_i = a . x_i + b . y_i: the per-sample gradient is (x_i, y_i), its mean and covariance known."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(16))
        self.b = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x, y):
        return (x @ self.a + y @ self.b).mean()


def linear_problem():
    """A Linear model with Adam's second moment in place (different per tensor, so the preconditioner matters),
    a sampler of per-sample gradients, and the true preconditioned noise scale."""
    gen = torch.Generator().manual_seed(1)
    ga, gb, sa, sb = 0.2, 1.0, 0.5, 0.1
    model = Linear()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    sample = lambda n: (ga + sa * torch.randn(n, 16, generator=gen), gb + sb * torch.randn(n, 4, generator=gen))
    model(*sample(64)).backward()
    opt.step()
    opt.zero_grad()
    meter = GradientNoiseMeter(model, opt, None, 1)
    wa, wb = meter.preconditioner(1).tolist()
    assert wa > 10 * wb     # `b` sees larger gradients: a smaller weight in the update's geometry
    truth = (wa * 16 * sa**2 + wb * 4 * sb**2) / (wa * 16 * ga**2 + wb * 4 * gb**2)
    plain = (16 * sa**2 + 4 * sb**2) / (16 * ga**2 + 4 * gb**2)
    assert abs(plain - truth) / truth > 0.3     # the tests can tell preconditioned from plain
    return model, opt, meter, sample, truth


def test_meter_measures_the_preconditioned_noise_scale_of_a_real_accumulated_step():
    model, opt, meter, sample, truth = linear_problem()
    ema = NoiseScaleEMA(init_batch=16, smoothing=0.995)
    micro, n = 4, 8
    for step in range(300):
        x, y = sample(micro * n)
        local = []
        for i in range(n):      # the trainer's accumulation: each micro-batch weighted 1/n
            (model(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]) / n).backward()
            if i < n - 1:
                local.append(local_grad_sq_norms(model))
        measurement = meter.measure(step + 2, local, micro, micro * n)
        ema.update(*estimate_from_pairs(measurement.pairs(measurement.values.tolist())), batch=micro * n)
        opt.zero_grad()
    assert ema.noise_scale == pytest.approx(truth, rel=0.15)


def test_consecutive_single_micro_batch_steps_make_the_noise_scale():
    model, opt, meter, sample, truth = linear_problem()
    ema = NoiseScaleEMA(init_batch=16, smoothing=0.995)
    batch, measured = 16, 0
    for step in range(2, 602):
        model(*sample(batch)).backward()
        measurement = meter.measure(step, [], batch, batch)
        if measurement is not None:
            shape = (measurement.small_batches, measurement.big_batch, measurement.samples)
            assert shape == ([batch], 2 * batch, 3 * batch)
            ema.update(*estimate_from_pairs(measurement.pairs(measurement.values.tolist())), batch=measurement.samples)
            measured += 1
        opt.zero_grad()
    assert measured == 200                      # triples without overlap: 2-3-4, 5-6-7, ..., 599-600-601
    assert ema.noise_scale == pytest.approx(truth, rel=0.15)


def test_the_weights_moving_between_steps_does_not_inflate_the_noise_scale():
    """The mean gradient turns a little every step (as training moves the weights): a difference of two
    consecutive steps would read that motion as noise and double the noise scale; the second difference of three
    cancels it."""
    model, opt, meter, sample, truth = linear_problem()
    wa, wb = meter.preconditioner(1).tolist()
    sa, sb, ga, gb, r, batch = 0.5, 0.1, 0.2, 1.0, 5.0, 16
    trace = wa * 16 * sa**2 + wb * 4 * sb**2
    theta = math.sqrt(2 * trace / (batch * wa)) / r   # a pair's drift term B |dG|^2 / 2 equals tr(Sigma)
    truth = trace / (wa * (14 * ga**2 + r**2) + wb * 4 * gb**2)
    gen = torch.Generator().manual_seed(2)
    ema = NoiseScaleEMA(init_batch=16, smoothing=0.995)
    grads, pair_traces = [], []
    for step in range(2, 902):
        mean_a = torch.full((16,), ga)
        mean_a[0], mean_a[1] = r * math.cos(theta * step), r * math.sin(theta * step)
        x = mean_a + sa * torch.randn(batch, 16, generator=gen)
        y = gb + sb * torch.randn(batch, 4, generator=gen)
        model(x, y).backward()
        grads.append((model.a.grad.clone(), model.b.grad.clone()))
        measurement = meter.measure(step, [], batch, batch)
        if measurement is not None:
            ema.update(*estimate_from_pairs(measurement.pairs(measurement.values.tolist())), batch=measurement.samples)
        opt.zero_grad()
    for (a1, b1), (a2, b2) in zip(grads[::2], grads[1::2]):     # what pairs of consecutive steps would say
        small = (wa * (a1.square().sum() + a2.square().sum()) + wb * (b1.square().sum() + b2.square().sum())) / 2
        mean = wa * ((a1 + a2) / 2).square().sum() + wb * ((b1 + b2) / 2).square().sum()
        pair_traces.append(two_batch_estimates(batch, float(small), 2 * batch, float(mean))[1])
    assert sum(pair_traces) / len(pair_traces) > 1.7 * trace
    assert ema.noise_scale == pytest.approx(truth, rel=0.15)


def test_meter_waits_for_adam_and_for_two_batch_sizes():
    model = Linear()
    opt = torch.optim.AdamW(model.parameters())
    meter = GradientNoiseMeter(model, opt, None, 1)
    splitting = GradientNoiseMeter(model, opt, None, 1, consecutive_steps=False)
    model(torch.ones(2, 16), torch.ones(2, 4)).backward()
    assert meter.measure(1, [local_grad_sq_norms(model)], 1, 2) is None    # no second moment yet
    opt.step()
    assert meter.measure(2, [], 2, 2) is None                              # one micro-batch: opens a triple
    assert meter.measure(3, [], 2, 2) is None                              # its second step
    assert meter.measure(4, [], 2, 2) is not None                          # ... and its third
    assert meter.measure(5, [], 2, 2) is None                              # opens the next
    assert meter.measure(7, [], 2, 2) is None                              # not consecutive: opens another
    assert meter.measure(8, [], 4, 4) is None                              # another batch size: another
    assert meter.measure(9, [], 4, 4) is None and meter.measure(10, [], 4, 4) is not None
    assert splitting.measure(3, [], 2, 2) is None and splitting.measure(4, [], 2, 2) is None
    meter.measure(11, [], 4, 4)
    meter.measure(12, [], 4, 4)                                            # a triple under way, its buffer kept
    meter.stop_consecutive_steps()                                         # the agent trusts its splits now
    assert meter._diff is None and all(meter.measure(s, [], 4, 4) is None for s in range(13, 19))
    assert meter.measure(19, [local_grad_sq_norms(model)], 2, 4) is not None     # split steps still measure


def test_spaced_triples_open_only_on_multiples_and_finish_across_them():
    model = Linear()
    opt = torch.optim.AdamW(model.parameters())
    meter = GradientNoiseMeter(model, opt, None, 1)
    model(torch.ones(2, 16), torch.ones(2, 4)).backward()
    opt.step()
    meter.space_triples(10)
    assert all(meter.measure(s, [], 2, 2) is None for s in range(11, 20))     # no triple opens off a multiple
    assert meter._run is None and meter._diff is None                         # ... nor copies the gradient
    assert meter.measure(20, [], 2, 2) is None and meter.measure(21, [], 2, 2) is None
    assert meter.measure(22, [], 2, 2).kind == "triple"                       # opened at 20, done at 22
    assert meter.measure(23, [], 2, 2) is None and meter._run is None
    assert meter.measure(25, [local_grad_sq_norms(model)], 1, 2) is not None   # split steps measure any step


def test_the_moving_average_knows_the_standard_error_of_its_signal():
    ema = NoiseScaleEMA(init_batch=8, smoothing=0.8)
    assert ema.grad_sqr_rel_error == math.inf
    values = [3.0, 1.0, 2.5, 0.5, 2.0]
    for v in values:
        ema.update(v, 10.0, batch=8)
    weights = [(1 - 0.8) * 0.8 ** (len(values) - 1 - i) for i in range(len(values))]
    total = sum(weights)
    mean = sum(w * v for w, v in zip(weights, values)) / total
    spread = sum(w * v * v for w, v in zip(weights, values)) / total - mean * mean
    expected = math.sqrt(spread * sum(w * w for w in weights)) / total / mean
    assert ema.grad_sqr == pytest.approx(mean)
    assert ema.grad_sqr_rel_error == pytest.approx(expected)
    restored = NoiseScaleEMA(init_batch=8, smoothing=0.8)
    restored.load_state_dict(ema.state_dict())
    assert restored.grad_sqr_rel_error == pytest.approx(expected)
