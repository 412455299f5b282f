"""Calibration and evaluation windows: fixed-length token sequences from a prepared data directory or a text file.

Pruning needs a few hundred sequences the model has not memorised to be typical of; a prepared glassbox data
directory (the token store `glassbox data prepare` writes) gives them without re-tokenising, and a plain .txt or
.jsonl file is tokenised with the model directory's own tokenizer. Windows start at seeded random offsets, so the
same seed always reads the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from glassbox.errors import GlassboxError


def _store_tokens(data_dir: Path, split: str) -> np.ndarray:
    from glassbox.data.store import TokenStore

    store = TokenStore(data_dir)
    bin_path = Path(f"{store.prefix(split)}.bin")
    if not bin_path.is_file():
        raise GlassboxError(f"{data_dir}: no {split!r} split ({bin_path.name} missing)")
    return np.memmap(bin_path, dtype=store.dtype, mode="r")


def _text_tokens(path: Path, model_dir: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise GlassboxError(f"{model_dir}: no tokenizer.json to tokenise calibration text {path}")
    tokenizer = Tokenizer.from_file(str(tok_path))
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise GlassboxError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
    else:
        texts = [path.read_text()]
    ids = [i for enc in tokenizer.encode_batch(texts) for i in enc.ids]
    return np.asarray(ids, dtype=np.int64)


def token_windows(source: Path, num_windows: int, seq_len: int, seed: int, vocab_size: int,
                  model_dir: Path | None = None, split: str = "train") -> torch.LongTensor:
    """[num_windows, seq_len] token ids from `source` (a prepared data dir's `split`, or a .txt / .jsonl file)."""
    source = Path(source)
    if num_windows <= 0 or seq_len <= 0:
        raise GlassboxError(f"calibration: need positive sample count and length, got {num_windows} x {seq_len}")
    if source.is_dir():
        tokens = _store_tokens(source, split)
    elif source.is_file():
        if model_dir is None:
            raise GlassboxError(f"{source}: a text calibration file needs the model directory's tokenizer")
        tokens = _text_tokens(source, Path(model_dir))
    else:
        raise GlassboxError(f"calibration data {source}: no such file or directory")
    if len(tokens) < seq_len + 1:
        raise GlassboxError(f"calibration data {source}: {len(tokens)} tokens, fewer than one {seq_len}-token window")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, len(tokens) - seq_len, size=num_windows))
    windows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))
    if int(windows.max()) >= vocab_size:
        raise GlassboxError(f"calibration data {source}: token id {int(windows.max())} is outside the model's "
                            f"vocabulary ({vocab_size}); was it tokenised with another tokenizer?")
    return windows
