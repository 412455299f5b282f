"""Fixtures for the data tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def store_copy(prepared_data: Path, tmp_path: Path) -> Path:
    """A private copy of the session's prepared DATA_DIR (without its index cache) that a test may modify."""
    dst = tmp_path / "store"
    shutil.copytree(prepared_data, dst, ignore=shutil.ignore_patterns("cache"))
    return dst
