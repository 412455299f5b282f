"""Hooks around the training loop (OLMo-core's callback idea).

Cross-cutting features (checkpointing, SCAR's recovery, Pollux's batch-size adaptation) are callbacks the loop
calls at fixed points, so the loop itself stays short and none of them is a branch scattered through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glassbox.train.state import TrainState


class Callback:
    """Override what you need; every hook receives the live `TrainState`."""

    def on_train_start(self, state: "TrainState") -> None:
        """Before the first step; a resume restores `state` here (model, optimizer, sampler, step, RNG...)."""

    def needs_state(self, step: int) -> bool:
        """Whether `on_step_end` after step `step` reads or changes the live training state (model, optimizer,
        sampler, RNG) rather than only `state.step` and `state.metrics`.

        The loop queues step t+1 on the GPU before it reads step t's metrics, so that reading them stalls nothing;
        when this says True for step t, it finishes step t first, so the callback sees the state exactly as step t
        left it. True (always safe) unless overridden.
        """
        return True

    def on_step_end(self, state: "TrainState") -> None:
        """After the optimizer step; `state.step` is the number of completed steps, `state.metrics` its metrics."""

    def on_train_end(self, state: "TrainState") -> None:
        """After the last step (also on a clean early stop); flush and wait for anything asynchronous."""
