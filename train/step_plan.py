"""The step plan: per step, the global batch, the micro-batch, the learning-rate scale and training progress.

The trainer asks the plan before every step, so any of them may change at any step: a fixed plan, a schedule of
stages from the config, or (later) Pollux's goodput-adaptive agent, each a `StepPlan`; the loop does not change.
Progress counts samples (a plan may weight them, e.g. by statistical efficiency); the learning-rate schedule is a
function of progress (train/lr_schedule.py). The data order does not depend on the plan (ARCHITECTURE.md,
invariant 1): a step of size B takes the next B samples. A plan's state (its kind and progress) is saved in
every checkpoint and its kind is checked on load; `ReplayPlan` replays the steps a run logged, so a run whose
batch sizes changed adaptively is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.train.config import BatchConfig, BatchStage


@dataclass(frozen=True)
class StepSpec:
    step: int              # 1-based
    global_batch: int      # samples, over all data-parallel ranks
    micro_batch: int       # samples per forward/backward on one rank
    lr_scale: float        # multiplies the scheduled learning rate
    progress: float        # training progress before this step, in samples (weighted, if the plan weights them)


class StepPlan:
    """Constant global batch and micro-batch, LR scale 1, progress = samples. Subclasses change `_shape`."""

    def __init__(self, global_batch: int, micro_batch: int):
        self.base_batch = global_batch
        self.micro_batch = micro_batch
        self.progress = 0.0         # before the next step to be queued

    @property
    def kind(self) -> str:
        return type(self).__name__

    def _shape(self, step: int) -> tuple[int, int, float]:
        """(global batch, micro-batch, LR scale) of step `step`."""
        return self.base_batch, self.micro_batch, 1.0

    def spec(self, step: int) -> StepSpec:
        """What step `step` (the next to be queued) will be; asking twice gives the same answer."""
        size, micro, scale = self._shape(step)
        return StepSpec(step, size, micro, scale, self.progress)

    def advance(self, spec: StepSpec) -> None:
        """Step `spec.step` is queued: count its samples."""
        self.progress = spec.progress + spec.global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise GlassboxError(f"step plan: the checkpoint was saved by a {state.get('kind')!r} plan, this run "
                                f"uses {self.kind!r} (batch.schedule or the plan given to the trainer differ)")
        self.progress = float(state["progress"])


class ScheduledPlan(StepPlan):
    """Piecewise-constant stages from `batch.schedule`: stage i holds from its `from_step` until the next."""

    def __init__(self, global_batch: int, micro_batch: int, stages: list[BatchStage]):
        super().__init__(global_batch, micro_batch)
        self.stages = list(stages)

    def _shape(self, step: int) -> tuple[int, int, float]:
        current = None
        for stage in self.stages:
            if stage.from_step <= step:
                current = stage
        if current is None:
            return self.base_batch, self.micro_batch, 1.0
        return current.size, self.micro_batch, current.lr_factor

    def state_dict(self) -> dict[str, Any]:
        stages = [{"from_step": s.from_step, "size": s.size, "lr_factor": s.lr_factor} for s in self.stages]
        return {**super().state_dict(), "base_batch": self.base_batch, "stages": stages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's stages hold from here on (a run resumed keeps the schedule it was planned with)."""
        super().load_state_dict(state)
        self.base_batch = int(state["base_batch"])
        self.stages = [BatchStage(**s) for s in state["stages"]]


class ReplayPlan(StepPlan):
    """The steps a run took, as its data-order log recorded them (glassbox.data.order_log), step for step."""

    def __init__(self, rows: dict[int, dict[str, Any]], base_batch: int):
        super().__init__(base_batch, 1)
        self.rows = rows

    def spec(self, step: int) -> StepSpec:
        if step not in self.rows:
            raise GlassboxError(f"replay: step {step} is not in the data-order log")
        r = self.rows[step]
        return StepSpec(step, int(r["batch_size"]), int(r["micro_batch_size"]), float(r["lr_scale"]),
                        float(r["progress"]))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Any plan's checkpoint: the replay takes each step from the log, whatever plan ran it."""
        self.progress = float(state["progress"])


PLANS: dict[str, Callable[[BatchConfig], StepPlan]] = {
    "fixed": lambda cfg: StepPlan(cfg.global_batch_size, cfg.micro_batch_size),
    "scheduled": lambda cfg: ScheduledPlan(cfg.global_batch_size, cfg.micro_batch_size, cfg.schedule),
}


def register_plan(name: str, factory: Callable[[BatchConfig], StepPlan]) -> None:
    """Make `batch.plan: name` build `factory(batch_config)` (how a feature module, e.g. Pollux, plugs in)."""
    if name in PLANS or name == "auto":
        raise GlassboxError(f"step plan {name!r} is registered already")
    PLANS[name] = factory


def build_step_plan(cfg: BatchConfig) -> StepPlan:
    """The plan `batch.plan` names; `auto` is `scheduled` when `batch.schedule` has stages, else `fixed`."""
    name = cfg.plan if cfg.plan != "auto" else ("scheduled" if cfg.schedule else "fixed")
    if name not in PLANS:
        raise ConfigError(f"batch.plan: unknown step plan {cfg.plan!r} (known: auto, {', '.join(sorted(PLANS))})")
    return PLANS[name](cfg)
