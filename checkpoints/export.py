"""Any checkpoint, alone, to a Hugging Face model directory (ARCHITECTURE.md, invariant 4).

A checkpoint carries its model config (in MANIFEST.json) and its tokenizer, so export needs nothing else: the
model weights are read from the DCP shards (whatever world size wrote them) into a plain Transformer on CPU and
written by `hf_format.save_hf_model_dir`. The optimizer state is never read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glassbox.checkpoints import dcp_io
from glassbox.checkpoints.hf_format import save_hf_model_dir
from glassbox.checkpoints.layout import DCP_DIR, TOKENIZER_DIR
from glassbox.checkpoints.loading import resolve_checkpoint_path
from glassbox.checkpoints.manifest import checked_manifest
from glassbox.config import from_dict
from glassbox.errors import GlassboxError
from glassbox.models.transformer import ModelConfig, RotaryEmbedding, Transformer


def load_model_from_checkpoint(path: Path, verify_hashes: bool = True) -> tuple[Transformer, dict]:
    """The checkpoint's model as a plain fp32 Transformer on CPU, plus its manifest."""
    path = resolve_checkpoint_path(Path(path))
    manifest = checked_manifest(path, verify_hashes)
    if not manifest.get("model"):
        raise GlassboxError(f"{path}: the manifest has no model config")
    cfg = from_dict(ModelConfig, manifest["model"], "model")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    state = model.state_dict()
    # Checkpoints store the weights in the dtype they were trained in; load into fp32 buffers of that shape.
    try:
        dcp_io.load({"model": state}, path / DCP_DIR)
    except Exception as e:      # DCP wraps read errors
        raise GlassboxError(f"{path}: cannot read model weights ({e})") from None
    return model.eval(), manifest


def export_checkpoint(path: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write checkpoint `path` (or a run directory's latest) as a transformers model directory at `out`."""
    path = resolve_checkpoint_path(Path(path))
    model, _ = load_model_from_checkpoint(path)
    tokenizer = path / TOKENIZER_DIR / "tokenizer.json"
    return save_hf_model_dir(model, Path(out), tokenizer if tokenizer.is_file() else None, dtype=dtype)
