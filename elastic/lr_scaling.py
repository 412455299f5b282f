"""Learning-rate scaling for a batch larger than the one the hyperparameters were tuned for, and the progress it
makes.

AdaScale (Johnson et al. 2020) scales SGD's learning rate by the gain r = (var + sqr) / (var / S + sqr), S = M / M0,
with var and sqr the gradient's variance at M0 and its squared norm (glassbox.elastic.gns): r is how many M0-steps
of progress one M-step makes, between 1 (a noise-free gradient: a bigger batch buys nothing) and S (pure noise:
a bigger batch is as good as S small steps). Adam normalizes the update by the gradient's magnitude, so a larger
batch's smaller variance does not enlarge its steps; Pollux scales Adam's learning rate by sqrt(r) instead, the
square-root rule for adaptive optimizers.

Progress is counted in efficiency-weighted samples: a step of M samples advances training by M * E(M) = M0 * r
samples' worth, and the learning-rate schedule (train/lr_schedule.py, a function of progress) moves by that, so
warmup and decay happen at the same statistical progress whatever the batch was.
"""

from __future__ import annotations

import math

from glassbox.errors import GlassboxError

OPTIMIZERS = ("adam", "sgd")


def gain(grad_sqr: float, grad_var: float, init_batch: int, batch: int) -> float:
    """AdaScale's r for batch M against M0; 1 when there is no estimate yet (sqr <= 0)."""
    if init_batch < 1 or batch < 1:
        raise GlassboxError(f"gain: batch sizes must be >= 1 (init_batch {init_batch}, batch {batch})")
    if grad_sqr <= 0:
        return 1.0
    scale = batch / init_batch
    var = max(grad_var, 0.0)
    return (var + grad_sqr) / (var / scale + grad_sqr)


def lr_scale(optimizer: str, r: float) -> float:
    """The factor on the scheduled learning rate: r for SGD, sqrt(r) for Adam(W)."""
    if optimizer == "sgd":
        return r
    if optimizer == "adam":
        return math.sqrt(r)
    raise GlassboxError(f"lr scaling: unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def progress_of_step(init_batch: int, r: float) -> float:
    """Efficiency-weighted samples one step with gain r makes: M0 * r (= M * E(M))."""
    return init_batch * r
