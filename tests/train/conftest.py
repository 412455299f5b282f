"""Fixtures of the training tests (helpers live in train_testlib.py, importable by spawned ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_testlib import unigram_entropy


@pytest.fixture(scope="session")
def unigram(prepared_data: Path) -> float:
    """Entropy of the training split's token frequencies, nats per token."""
    return unigram_entropy(prepared_data)
