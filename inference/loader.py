"""Open a Hugging Face-format model directory for serving: weights, tokenizer, and end-of-sequence tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glassbox.errors import GlassboxError
from glassbox.inference.tokenizer import Tokenizer
from glassbox.models.transformer import Transformer


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def eos_token_ids(model_dir: Path, tokenizer: Tokenizer | None) -> list[int]:
    """generation_config.json's eos_token_id, else config.json's, else the tokenizer config's eos_token."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            ids = _ids(json.loads(path.read_text()).get("eos_token_id"))
            if ids:
                return ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return []


def load_model_dir(model_dir: Path, dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> tuple[Transformer, Tokenizer | None, list[int]]:
    from glassbox.checkpoints.hf_format import load_hf_model_dir

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GlassboxError(f"model directory not found: {model_dir}")
    from glassbox.checkpoints.hf_swiftkv import is_swiftkv_dir, load_swiftkv_model_dir

    load = load_swiftkv_model_dir if is_swiftkv_dir(model_dir) else load_hf_model_dir
    model, _ = load(model_dir, dtype=dtype, device=device)
    tokenizer = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return model, tokenizer, eos_token_ids(model_dir, tokenizer)
