"""RUN_DIR/metrics.jsonl: one JSON object per optimizer step, appended as the run goes.

Each step appends one line and closes the file, so a killed process loses at most the step it was writing;
a torn last line (a crash mid-write) is skipped by `read_metrics`, and `truncate` (after a resume from an
earlier step) rewrites the file atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glassbox.atomic import write_text
from glassbox.errors import GlassboxError


def read_metrics(path: str | Path, *, required: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics file (or of RUN_DIR/metrics.jsonl when given the run directory).

    Only the last line can be torn by a crash mid-append, so only it is skipped when it does not parse; a bad
    line anywhere else means the file was damaged and is an error naming `path:line`. A missing file is an
    empty log for a run that may not have stepped yet, and an error when `required` (a finished run must have
    one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        if required:
            raise GlassboxError(f"{path} is missing: not a finished run")
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise GlassboxError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


class MetricsLog:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def truncate(self, last_step: int) -> None:
        """Keep only rows of steps <= last_step (a resumed run rewrites the steps after its checkpoint)."""
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= last_step]
        write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
