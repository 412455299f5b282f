"""Read a finished run directory for a release, refusing anything incomplete or inconsistent up front.

A release must not start from a run that is still going, lost its final checkpoint, or whose data no longer
matches what was trained on, so every one of those is checked here, before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.train.metrics_log import read_metrics


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Committed checkpoints by step (`checkpoints/step_NNNNNN/`; staging `.tmp` folders are not commits)."""
    from glassbox.checkpoints.layout import checkpoints_root, list_checkpoints as committed

    return dict(committed(checkpoints_root(run_dir)))


@dataclass
class RunInfo:
    run_dir: Path
    config: Any                       # RunConfig
    config_text: str                  # config.yaml exactly as the run wrote it
    manifest: dict[str, Any]          # the run's manifest.json
    metrics: list[dict[str, Any]]     # metrics.jsonl rows
    checkpoints: dict[int, Path]      # step -> committed checkpoint directory
    order_log: Any                    # glassbox.data.order_log.DataOrderLog

    def train_loss_curve(self) -> tuple[list[int], list[float]]:
        rows = [r for r in self.metrics if "loss" in r and "step" in r]
        return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def read_run(run_dir: Path) -> RunInfo:
    """Load a finished run; a missing piece, an unfinished run or a data mismatch is a one-line error."""
    from glassbox.data.order_log import DataOrderLog
    from glassbox.train.config import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GlassboxError(f"run directory not found: {run_dir}")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise GlassboxError(f"{config_path} is missing: not a glassbox run directory")
    cfg = load_run_config(config_path)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise GlassboxError(f"{manifest_path} is missing: not a glassbox run directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise GlassboxError(f"{manifest_path}: not JSON ({e.msg})") from None
    metrics = read_metrics(run_dir / "metrics.jsonl", required=True)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise GlassboxError(f"no checkpoints in {run_dir / 'checkpoints'}: nothing to release")
    last = max(checkpoints)
    if last < cfg.schedule.steps:
        raise GlassboxError(
            f"run {run_dir} is incomplete: its last checkpoint is step {last} of schedule.steps={cfg.schedule.steps}"
        )
    if not (run_dir / "data_order.zarr").exists():
        raise GlassboxError(f"{run_dir / 'data_order.zarr'} is missing: the data order cannot be released")
    order_log = DataOrderLog(run_dir, read_only=True)
    if len(order_log) < last:
        raise GlassboxError(
            f"{run_dir / 'data_order.zarr'} has {len(order_log)} steps but the last checkpoint is step {last}"
        )
    return RunInfo(run_dir, cfg, config_path.read_text(), manifest, metrics, checkpoints, order_log)
