"""Any checkpoint, alone, to a Hugging Face model directory (ARCHITECTURE.md, invariant 4).

A checkpoint carries its model config (in MANIFEST.json) and its tokenizer, so export needs nothing but the run's
checkpoints folder: the model weights are read through the checkpoint's view (checkpoints/index.py: each tensor
from the checkpoint holding its copy, whatever world size wrote it) into a plain Transformer on CPU and written
by `hf_format.save_hf_model_dir`. The optimizer state is never read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glassbox.checkpoints.hf_format import save_hf_model_dir
from glassbox.checkpoints.layout import TOKENIZER_DIR
from glassbox.checkpoints.loading import load_view, resolve_checkpoint_path, verified_view
from glassbox.config import from_dict
from glassbox.errors import GlassboxError
from glassbox.models.transformer import ModelConfig, Transformer


def load_model_from_checkpoint(path: Path, verify_hashes: bool = True) -> tuple[Transformer, dict]:
    """The checkpoint's model as a plain fp32 Transformer on CPU, plus its manifest."""
    view = verified_view(Path(path), verify_hashes)
    path, manifest = view.path, view.manifest
    if not manifest.get("model"):
        raise GlassboxError(f"{path}: the manifest has no model config")
    if any(name.startswith("swiftkv_") for name in view.tensors):
        raise GlassboxError(f"{path} is a checkpoint of a SwiftKV model: export it with `glassbox swiftkv export "
                            "--checkpoint ... --like INIT_FROM_DIR --out DIR`")
    cfg = from_dict(ModelConfig, manifest["model"], "model")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.materialize("cpu")
    # Checkpoints store the weights in the dtype they were trained in; they load into fp32 buffers of that shape,
    # each from the checkpoint its view names.
    load_view(view, model)
    return model.eval(), manifest


def export_checkpoint(path: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write checkpoint `path` (or a run directory's latest) as a transformers model directory at `out`."""
    path = resolve_checkpoint_path(Path(path))
    model, _ = load_model_from_checkpoint(path)
    tokenizer = path / TOKENIZER_DIR / "tokenizer.json"
    return save_hf_model_dir(model, Path(out), tokenizer if tokenizer.is_file() else None, dtype=dtype)
