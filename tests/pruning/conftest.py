"""Fixtures of the pruning tests (helpers live in pruning_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pruning_helpers import train_and_export


@pytest.fixture(scope="session")
def moe_dir(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny Mixtral-format MoE directory (with the corpus's tokenizer)."""
    return train_and_export(prepared_data, tmp_path_factory.mktemp("moe"))
