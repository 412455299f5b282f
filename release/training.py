"""A private Trainer over a run's exact config, for replaying steps.

`glassbox reproduce` needs the run's model, optimizer, scheduler and sampler exactly as training built them, so
it constructs the real Trainer from the run's resolved config. Only what cannot change the math is overridden:
the run directory (a scratch folder, so the original run is never written to), resuming, wandb, progress bars,
and where the data lives.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from glassbox.config import apply_overrides, from_dict


def scratch_config(config_text: str, work_dir: Path, data_paths: list[str] | None = None):
    """The run's RunConfig with the run directory moved to `work_dir` and, if given, the data moved to `data_paths`."""
    from glassbox.train.config import RunConfig

    data = yaml.safe_load(config_text)
    overrides = [f"run_dir={work_dir}", "checkpoint.resume=null", "logging.wandb.mode=disabled",
                 "logging.progress=false", "fault_tolerance.recovery=none", "fault_tolerance.inject=null"]
    data = apply_overrides(data, overrides)
    if data_paths is not None:
        section = data.setdefault("data", {})
        if section.get("blend"):
            for src, path in zip(section["blend"], data_paths):
                src["path"] = path
        else:
            section["path"] = data_paths[0]
    return from_dict(RunConfig, data)


def scratch_trainer(config_text: str, work_dir: Path, data_paths: list[str] | None = None, plan=None):
    """A Trainer with no callbacks whose run directory is `work_dir`; `plan` replaces the config's step plan
    (a replay of the logged steps)."""
    from glassbox.train.trainer import Trainer

    return Trainer(scratch_config(config_text, work_dir, data_paths), callbacks=[], plan=plan)


def load_into(trainer, checkpoint_dir: Path) -> None:
    """Restore a committed checkpoint (weights, optimizer, scheduler, sampler, step) into the trainer's state."""
    from glassbox.checkpoints.loading import load_checkpoint

    load_checkpoint(checkpoint_dir, trainer.state)
