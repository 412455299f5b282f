"""`glassbox train`: train from a run config, in this process or (`--nproc N`) under torchrun.

The same flags work for `torchrun --nproc-per-node N -m glassbox.train`. Shortcut flags are sugar for `--set`:
`--data DIR` is `--set data.path=DIR`, `--run-dir DIR` is `--set run_dir=DIR`, `--steps N` is
`--set schedule.steps=N`, `--resume X` is `--set checkpoint.resume=X`, `--recovery R` is
`--set fault_tolerance.recovery=R` (with `--resume auto`), `--inject-failure SPEC` is `--set fault_tolerance.inject=SPEC`. Steps set here below the config's
`warmup_steps` shorten the warmup to the run (with a warning), so a quick `--steps 10` of any config runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from glassbox.errors import GlassboxError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
FAULT_TOLERANT_RESTARTS = 3     # torchrun --max-restarts of `--nproc N` runs with fault_tolerance.recovery set


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="run config YAML, or the name of one in configs/ (tiny, moe-tiny, small, 1b, amber-7b)")
    p.add_argument("--data", help="prepared DATA_DIR (sets data.path)")
    p.add_argument("--run-dir", help="run directory (sets run_dir)")
    p.add_argument("--steps", type=int, help="optimizer steps (sets schedule.steps)")
    p.add_argument("--resume", help="'auto' or a checkpoint path (sets checkpoint.resume)")
    p.add_argument("--recovery", choices=["full", "partial"],
                   help="after a restart (torchrun --max-restarts): roll every rank back to the last checkpoint "
                        "(full), or keep the survivors' state and restore only the lost ranks' (partial, SCAR); "
                        "sets fault_tolerance.recovery, and --resume auto unless --resume is given")
    p.add_argument("--inject-failure", metavar="rank=K,step=S[,mid_save]",
                   help="kill -9 rank K at step S (or mid-way through its partial checkpoint of step S), once per "
                        "run directory, to test recovery (sets fault_tolerance.inject)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optimizer.lr=1e-3 (repeatable)")


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIGS_DIR / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise GlassboxError(f"config not found: {name} (not a file, nor one of configs/: {known})")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    # JSON-quoted values are valid YAML scalars, so a path like "2024" stays a string.
    resume = args.resume if args.resume is not None or args.recovery is None else "auto"
    shortcuts = [("data.path", args.data), ("run_dir", args.run_dir), ("schedule.steps", args.steps),
                 ("checkpoint.resume", resume), ("fault_tolerance.recovery", args.recovery),
                 ("fault_tolerance.inject", args.inject_failure)]
    return [f"{key}={json.dumps(value)}" for key, value in shortcuts if value is not None] + list(args.overrides)


def resolved_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's overrides, plus `schedule.warmup_steps=N` where they shorten the run to N steps, below
    the config's warmup: a short run of a config (`--steps 10`, warmup 100) warms up over all its steps, with one
    warning, where the config itself would be refused. A warmup also set on the command line is not clamped."""
    from glassbox.config import apply_overrides, from_dict, load_yaml, parse_override
    from glassbox.train.config import ScheduleConfig

    overrides = overrides_from_args(args)
    keys = {".".join(parse_override(text)[0]) for text in overrides}
    if "schedule.steps" not in keys or "schedule.warmup_steps" in keys:
        return overrides
    section = apply_overrides(load_yaml(resolve_config_path(args.config)), list(overrides)).get("schedule")
    if not isinstance(section, dict):
        return overrides    # loading the config names the problem
    schedule = from_dict(ScheduleConfig, section, "schedule")
    if schedule.warmup_steps <= schedule.steps:
        return overrides
    if os.environ.get("RANK", "0") == "0":   # once under torchrun too, not once per rank
        print(f"glassbox: warning: schedule.steps ({schedule.steps}) from the command line is below "
              f"schedule.warmup_steps ({schedule.warmup_steps}): warming up over all {schedule.steps} steps "
              f"(schedule.warmup_steps={schedule.steps})", file=sys.stderr)
    return overrides + [f"schedule.warmup_steps={schedule.steps}"]


def config_from_args(args: argparse.Namespace):
    from glassbox.train.config import load_run_config

    return load_run_config(resolve_config_path(args.config), resolved_overrides(args))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a run config (one process, or --nproc N via torchrun)")
    add_train_args(p)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine; >1 launches torchrun")
    p.set_defaults(handler=run)


def torchrun_command(args: argparse.Namespace, overrides: list[str], max_restarts: int = 0) -> list[str]:
    """`overrides` as resolved here (`resolved_overrides`), so the ranks get a clamped warmup as given;
    `max_restarts`: how often torchrun restarts the workers after a failure (fault-tolerant runs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={max_restarts}", "-m", "glassbox.train", "--config", str(resolve_config_path(args.config))]
    for override in overrides:
        cmd += ["--set", override]
    return cmd


def torchrun_env(max_restarts: int) -> dict[str, str]:
    """The environment for torchrun. With restarts, each rendezvous round gets a fresh TCP store: on a shared
    one (torchrun's default) the restarted workers can read their dead predecessors' gloo addresses and fail to
    connect ("Connection refused"), which we saw on every slow restart."""
    env = dict(os.environ)
    if max_restarts:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def summary(state) -> str:
    m = state.metrics
    text = f"trained {state.step} steps ({state.tokens:,} tokens) into {state.run_dir}: loss {m.get('loss', 0):.4f}"
    if "val_loss" in m:
        text += f", validation loss {m['val_loss']:.4f}"
    if "val_kl" in m:                   # a distillation run: the held-out KL to its teacher
        text += f", validation KL {m['val_kl']:.4f}"
    return text


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise GlassboxError(f"--nproc: must be >= 1, got {args.nproc}")
    from glassbox.train.config import load_run_config

    overrides = resolved_overrides(args)
    cfg = load_run_config(resolve_config_path(args.config), overrides)
    if args.nproc > 1:
        restarts = FAULT_TOLERANT_RESTARTS if cfg.fault_tolerance.enabled else 0
        return subprocess.call(torchrun_command(args, overrides, restarts), env=torchrun_env(restarts))
    from glassbox.train.trainer import Trainer

    state = Trainer(cfg).fit()
    print(summary(state))
    return 0
