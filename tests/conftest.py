"""Shared fixtures for every test area."""

from __future__ import annotations

from pathlib import Path

import pytest

# A few hundred KB of the standard library: enough text for a vocab-512 BPE and thousands of 64-token samples,
# small enough to prepare in a few seconds once per session.
PREPARED_DATA_BYTES = 300_000
PREPARED_DATA_VOCAB = 512


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared DATA_DIR (stdlib .py text, byte-level BPE vocab 512), built once per test session."""
    from glassbox.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(["stdlib"], out, vocab_size=PREPARED_DATA_VOCAB, max_bytes=PREPARED_DATA_BYTES, progress=False)
    return out
