"""Shared fixtures for every test area."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# A few hundred KB of the standard library: enough text for a vocab-512 BPE and thousands of 64-token samples,
# small enough to prepare in a few seconds once per session.
PREPARED_DATA_BYTES = 300_000
PREPARED_DATA_VOCAB = 512
# The data settings of the multi-process tests' tiny configs (tests/checkpoints/test_fault_injection.py,
# tests/fault_tolerance/test_partial_recovery_gloo.py), whose sample index `indexed_data` builds ahead of them.
INDEXED_SEQ_LEN = 32
INDEXED_SEED = 7


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared DATA_DIR (stdlib .py text, byte-level BPE vocab 512), built once per test session."""
    from glassbox.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(["stdlib"], out, vocab_size=PREPARED_DATA_VOCAB, max_bytes=PREPARED_DATA_BYTES, progress=False)
    return out


@pytest.fixture(scope="session")
def indexed_data_master(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `prepared_data` with its train and valid sample index built for seq_len INDEXED_SEQ_LEN, seed
    INDEXED_SEED, once per session. Under torchrun a run that finds no index builds it in a child process that
    imports megatron-core anew for each split, seconds of every multi-process test's first launch (and its first
    launch only, which also skewed timings measured on it); built here it costs a fraction of a second."""
    from glassbox.data.config import DataConfig
    from glassbox.data.sampler import build_sampler

    out = tmp_path_factory.mktemp("indexed") / "data"
    shutil.copytree(prepared_data, out, ignore=shutil.ignore_patterns("cache"))
    for split in ("train", "valid"):
        build_sampler(DataConfig(path=str(out), seq_len=INDEXED_SEQ_LEN, seed=INDEXED_SEED), split)
    return out


@pytest.fixture
def indexed_data(indexed_data_master: Path, tmp_path: Path) -> Path:
    """A private copy of `indexed_data_master`, index cache included: the index files are keyed by the store's
    content, not its location, so runs on the copy find them ready."""
    out = tmp_path / "data"
    shutil.copytree(indexed_data_master, out)
    return out
