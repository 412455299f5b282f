"""Token rows to calibrate a model transform on: `glassbox swiftkv convert --init lsq` fits SwiftKV's new K/V
projections to them. Best the prepared DATA_DIR the model is then distilled on (`swiftkv teacher-data`'s output,
the teacher's own answers: the distribution that matters), else any corpus source `glassbox data prepare` reads,
tokenized with the model's own tokenizer. A data-layer reader, so the checkpoint formats that convert models can
use it without importing training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glassbox.atomic import sha256_file
from glassbox.errors import GlassboxError

DEFAULT_CALIB_TOKENS = 8192
CALIB_SEQ_LEN = 256         # calibration rows: long enough that hidden states see real context
CALIB_BYTES_PER_TOKEN = 16  # bytes read from a text source per wanted token: a BPE needs 3-5, so this is ample


def calibration_tokens(source: str, tokenizer_json: Path, count: int,
                       seq_len: int = CALIB_SEQ_LEN) -> torch.LongTensor:
    """About `count` token ids [rows, seq_len] for `swiftkv convert --init lsq`: the train split of a prepared
    DATA_DIR (`teacher-data`'s output: the teacher's own answers, which the student is then distilled on; its
    tokenizer must be the model's), or a corpus source as `glassbox data prepare` reads it (`stdlib`, .txt,
    .jsonl, .parquet files), tokenized with the model's `tokenizer_json`. Whole rows, so up to a row more; fewer
    when the source is short."""
    if count < 1:
        raise GlassboxError(f"--calib-tokens {count}: must be positive")
    seq_len = min(seq_len, count)
    rows = -(-count // seq_len)
    if (Path(source) / "meta.json").is_file():
        return _store_rows(Path(source), Path(tokenizer_json), rows, seq_len)
    return _source_rows(source, Path(tokenizer_json), rows, seq_len)


def _store_rows(data_dir: Path, tokenizer_json: Path, rows: int, seq_len: int) -> torch.LongTensor:
    from glassbox.data.config import DataConfig
    from glassbox.data.sampler import build_sampler
    from glassbox.data.store import TokenStore

    store = TokenStore(data_dir)
    if sha256_file(store.tokenizer_path) != sha256_file(tokenizer_json):
        raise GlassboxError(f"--calib {data_dir}: its tokenizer.json is not the model's ({tokenizer_json}); "
                            "prepare the data with the model's tokenizer")
    sampler = build_sampler(DataConfig(path=str(data_dir), seq_len=seq_len, seed=0), "train")
    return sampler.samples(0, min(rows, sampler.epoch_size))[:, :seq_len]


def _source_rows(source: str, tokenizer_json: Path, rows: int, seq_len: int) -> torch.LongTensor:
    from glassbox.data.sources import read_source
    from glassbox.data.tokenizer import eot_token, load_tokenizer

    tok = load_tokenizer(tokenizer_json)
    _, eod = eot_token(tok, str(tokenizer_json))
    try:
        docs = read_source(source, max_bytes=rows * seq_len * CALIB_BYTES_PER_TOKEN).documents
    except GlassboxError as e:
        raise GlassboxError(f"--calib: {e}") from None
    ids = [t for doc in docs for t in tok.encode(doc, add_special_tokens=False).ids + [eod]]
    if not docs or len(ids) <= len(docs):
        raise GlassboxError(f"--calib {source}: no text to calibrate on")
    n = min(rows, len(ids) // seq_len)
    if n == 0:
        return torch.tensor([ids])
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)
