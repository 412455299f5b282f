"""Names inside a run's checkpoints folder, shared by saving, loading and export.

RUN_DIR/checkpoints/step_000100/ is a committed checkpoint (renamed into place complete); step_000100.tmp/ is
one being written (or left by a killed process, removed by the next save); `latest` is a one-line text file
naming the newest committed checkpoint, replaced atomically after each commit.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
DCP_DIR = "dcp"
CONFIG = "config.yaml"
TOKENIZER_DIR = "tokenizer"
# A run started from a pretrained directory (init_from) also carries that directory's chat template and special
# tokens in TOKENIZER_DIR: its data holds the tokenizer alone, and an export must chat like the base did.
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")
_STEP_RE = re.compile(r"step_(\d{6,})")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root` (a run's checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_RE.fullmatch(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS
