"""Shared fixtures for the checkpoint tests: a small real BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_helpers import EOD


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 300, end-of-text special token) trained on standard-library source."""
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([inspect.getsource(json), inspect.getsource(Path)], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "meta.json").write_text(json.dumps({"eod_id": tok.token_to_id(EOD), "vocab_size": tok.get_vocab_size()}))
    return out


def pytest_configure(config: pytest.Config) -> None:
    # DCP without a process group says it assumes a single process; glassbox.checkpoints.dcp_io silences that
    # for real runs, pytest re-enables warnings per test.
    config.addinivalue_line("filterwarnings", "ignore:.*assuming the intent is to (load|save) in a single process")
