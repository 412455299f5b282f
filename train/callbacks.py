"""Hooks around the training loop (OLMo-core's callback idea), where features such as SCAR and Pollux live.

A callback is set up once with the trainer (its parts: state, world, step plan, checkpointer), then called at
fixed points of every step, in ascending `order`, except `on_step_end` and `on_train_end`, which run in
descending order (last started, first ended), so the checkpoint callback saves after the others' updates. A callback with a `state_dict` has that state saved in every
checkpoint and restored on resume, under its `name`. Defaults are overlap-safe: a hook that only reads metrics
never stops the loop from queueing the next step while the previous one is read back (see `needs_state`).

The points, in the order one step meets them (step t+1 is queued before step t is read back, so the queue-time
hooks of t+1 run before `on_step_end` of t):
  on_step_start(state, spec, tokens)   before the forward passes, with the step's plan and this rank's batch
  on_after_backward(state, grads)      gradients accumulated, before clipping and the optimizer
  on_optimizer_step(state, spec)       after the optimizer step (device work queued, nothing read back)
  on_step_end(state)                   the step is finished: `state.step`, `state.metrics`
  on_checkpoint(state, path)           a checkpoint was committed
  on_resume(state, path)               training state was restored (a resume, or a recovery)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from glassbox.train.state import TrainState
    from glassbox.train.step_plan import StepSpec
    from glassbox.train.trainer import Trainer


@dataclass
class GradientStats:
    """What `on_after_backward` sees, all on the device (reading it forces no host sync).

    `local_sq_norms[i]`: the squared L2 norm of this rank's accumulated gradient after micro-batch i + 1, for
    the micro-batches whose gradients are not yet reduced (all but the last; computed only when a callback's
    `wants_local_norms` is True). `sq_norm`: the squared norm of the reduced (global-batch) gradient, before
    clipping. Together they are the two batch sizes of the gradient-noise-scale estimators.
    `local_tensor_sq_norms[i]`: the same, as per-parameter squared norms (parallel.local_grad_sq_norms: the
    trainable parameters in `model.parameters()` order), so a callback can weight parameters (Pollux's Adam
    preconditioning) at no extra cost.
    """

    local_sq_norms: list[torch.Tensor]
    sq_norm: torch.Tensor
    micro_batch: int        # samples per micro-batch on one rank
    global_batch: int
    local_tensor_sq_norms: list[torch.Tensor] = field(default_factory=list)


class Callback:
    """Override what you need; every hook receives the live `TrainState`."""

    order: int = 0                  # ascending; the checkpoint callback (-100) restores before others start
    wants_local_norms: bool = False  # compute GradientStats.local_sq_norms (one fused norm per micro-batch)

    @property
    def name(self) -> str:
        """Where its state goes in checkpoints (unique per run)."""
        return type(self).__name__

    def setup(self, trainer: "Trainer") -> None:
        """Once, when the trainer is built: keep the parts you need (trainer.state, .world, .checkpointer ...)."""

    def state_dict(self) -> dict[str, Any] | None:
        """State saved in checkpoints; None (the default) for a callback without any."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def needs_state(self, step: int) -> bool:
        """Whether `on_step_end` after step `step` reads or changes the live training state (model, optimizer,
        sampler, RNG) rather than only `state.step` and `state.metrics`.

        The loop queues step t+1 on the device before it reads step t's metrics, so that reading them stalls
        nothing; when this says True for step t, it finishes step t first, so the callback sees the state exactly
        as step t left it. False unless overridden: saying True costs the overlap on that step.
        """
        return False

    def on_train_start(self, state: "TrainState") -> None:
        """Before the first step; the checkpoint callback restores a resumed `state` here (it runs first)."""

    def on_resume(self, state: "TrainState", path: Path) -> None:
        """After `state` was restored from checkpoint `path` (a resume, or a recovery)."""

    def on_step_start(self, state: "TrainState", spec: "StepSpec", tokens: torch.Tensor) -> None:
        """Before step `spec.step`'s forward passes; `tokens` is this rank's share of its batch (on the host)."""

    def on_after_backward(self, state: "TrainState", grads: GradientStats) -> None:
        """After the step's backward passes, before clipping and the optimizer step."""

    def on_optimizer_step(self, state: "TrainState", spec: "StepSpec") -> None:
        """After the optimizer step of step `spec.step` (its work queued on the device)."""

    def on_step_end(self, state: "TrainState") -> None:
        """After the step is finished; `state.step` is the number of completed steps, `state.metrics` its row."""

    def on_checkpoint(self, state: "TrainState", path: Path) -> None:
        """After checkpoint `path` was committed (on rank 0 for an async save; on every rank otherwise)."""

    def on_train_end(self, state: "TrainState") -> None:
        """After the last step (also on a clean early stop); flush and wait for anything asynchronous."""


def ordered(callbacks: list[Callback]) -> list[Callback]:
    """Ascending `order`, stable; two callbacks with state may not share a name."""
    result = sorted(callbacks, key=lambda cb: cb.order)
    names = [cb.name for cb in result if cb.state_dict() is not None]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        from glassbox.errors import GlassboxError

        raise GlassboxError(f"callbacks: two callbacks with state are named {sorted(duplicates)[0]!r}")
    return result
