"""RUN_DIR/manifest.json: what produced this run (code, data, software, hardware) and how its world changed.

The trainer writes it at every start (fresh or resumed), keeping what is already there: each start appends to
`world_size_history`, and later modules (SCAR's recoveries) append their own events with `append_event`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import glassbox
from glassbox.atomic import write_json

REPO_ROOT = Path(glassbox.__file__).resolve().parents[1]


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the source tree glassbox runs from (None outside a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def hardware_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_run_manifest(run_dir: str | Path, *, data: dict[str, Any], device: torch.device, step: int,
                       world_size: int, dp: int, tp: int) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    manifest.update({
        "glassbox_version": glassbox.__version__,
        "git": git_info(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "data": data,
        "hardware": hardware_info(device),
    })
    history = [h for h in manifest.get("world_size_history", []) if h["step"] < step]
    history.append({"step": step, "world_size": world_size, "dp": dp, "tp": tp,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    manifest["world_size_history"] = history
    write_json(Path(run_dir) / "manifest.json", manifest)
    return manifest


def append_event(run_dir: str | Path, key: str, event: dict[str, Any]) -> None:
    """Add `event` to the list `key` of the manifest (e.g. "recovery_events")."""
    manifest = read_manifest(run_dir)
    manifest.setdefault(key, []).append(event)
    write_json(Path(run_dir) / "manifest.json", manifest)
