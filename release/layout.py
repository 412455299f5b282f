"""Where everything lives in a release directory, and how checkpoint branches are named.

A release directory holds two Hub repositories side by side, each a plain folder that uploads as-is:

```
RELEASE_DIR/
  release.json       index: repo ids, branches (step, tokens, validation loss), probe ids and logits
  manifest.json      sha256 and size of every other file in RELEASE_DIR
  model/             the model repo's `main`: final model (HF export), model card, metrics, reproduce kit, analyses
  branches/NAME/     one model-repo branch per checkpoint: a complete HF export + training_state/ (the raw checkpoint)
  dataset/           the dataset repo: token store, released chunks, sample-order index, data-order log, tokenizer
```

Branch names are `step` followed by the step number zero-padded to eight digits (`step00000100`), so sorting the
names as strings sorts them by step, as Pythia's `step143000` revisions do without the padding. Eight digits cover
runs up to 99,999,999 steps; a longer run is refused rather than given names that would sort wrongly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError

BRANCH_DIGITS = 8
_BRANCH_RE = re.compile(rf"^step(\d{{{BRANCH_DIGITS}}})$")

RELEASE_INDEX = "release.json"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
BRANCHES_DIR = "branches"
DATASET_DIR = "dataset"
TRAINING_STATE = "training_state"


def branch_name(step: int) -> str:
    """`step00000100` for step 100: fixed width so string order is step order."""
    if not 0 <= step < 10**BRANCH_DIGITS:
        raise GlassboxError(f"step {step} does not fit the {BRANCH_DIGITS}-digit branch naming scheme")
    return f"step{step:0{BRANCH_DIGITS}d}"


def branch_step(name: str) -> int:
    """Inverse of `branch_name`; a name outside the scheme is an error naming it."""
    m = _BRANCH_RE.match(name)
    if not m:
        raise GlassboxError(f"branch {name!r} is not a release branch name (expected step + {BRANCH_DIGITS} digits)")
    return int(m.group(1))


class ReleaseLayout:
    """Paths inside one release directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def index(self) -> Path:
        return self.root / RELEASE_INDEX

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def branches(self) -> Path:
        return self.root / BRANCHES_DIR

    @property
    def dataset(self) -> Path:
        return self.root / DATASET_DIR

    def branch(self, name: str) -> Path:
        return self.branches / name

    def training_state(self, name: str) -> Path:
        return self.branch(name) / TRAINING_STATE

    def read_json(self, path: Path) -> Any:
        """A JSON file of the release; unreadable JSON is an error naming the file."""
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise GlassboxError(f"{path} is missing") from None
        except json.JSONDecodeError as e:
            raise GlassboxError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def read_index(self) -> dict[str, Any]:
        self.check()
        return self.read_json(self.index)

    def check(self) -> None:
        """A directory that is not a built release is an error naming what is missing."""
        if not self.root.is_dir():
            raise GlassboxError(f"release directory not found: {self.root}")
        for path in (self.index, self.manifest, self.model, self.dataset):
            if not path.exists():
                raise GlassboxError(f"{self.root} is not a glassbox release: {path.name} is missing")
