"""One tiny real training run and one release of it, shared by the release tests.

The run trains a 2-layer model for 4 steps on the session's prepared data with Pythia-style log-spaced
checkpoints (steps 1, 2 and 4), so there is a checkpoint reached from the initialisation, one from another
checkpoint one step back, and one two steps back. Tests that change files work on copies.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from release_helpers import tiny_run_config


@pytest.fixture(scope="session")
def tiny_run(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glassbox.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("release_run") / "tiny"
    Trainer(tiny_run_config(prepared_data, run_dir)).fit()
    return run_dir


@pytest.fixture(scope="session")
def built_release(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release of `tiny_run`; tests must not modify it (copy it with `copy_tree` first)."""
    from glassbox.release.build import BuildOptions, build_release

    out = tmp_path_factory.mktemp("release") / "tiny-release"
    build_release(tiny_run, out, BuildOptions(repo_id="glassbox-test/tiny", val_samples=4))
    return out
