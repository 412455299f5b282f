"""`init_from`: start a run from a pretrained Hugging Face model directory instead of a random init.

Fine-tuning (Dynasor's helper, SwiftKV distillation) trains a model someone else pretrained, so the run's model
section cannot be written by hand: it is read from the directory's config.json when the config is loaded, and
the resolved shape is what config.yaml records. The model is still built the usual way (meta device, parallelized,
initialised, so the RNG advances exactly as in any run), then every parameter is overwritten from the
directory's safetensors, each rank copying only its own shard. A resumed run restores its checkpoint over that,
as any run does.

The tokenizer is part of the model: token ids mean nothing under another vocabulary. The data pipeline already
takes a given tokenizer.json (`glassbox data prepare --tokenizer MODEL_DIR/tokenizer.json`), so the trainer only
checks that every data source was prepared with the directory's own tokenizer (same file hash) and refuses the
run otherwise, naming both files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glassbox.atomic import sha256_file
from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.models.transformer import ModelConfig, Transformer, unwrap

# Model fields a run may set beside init_from: they change how the weights are trained, not what they are.
# max_seq_len is the context the run trains at (rotary tables do not depend on it); the rest is from the directory.
OVERRIDABLE_MODEL_FIELDS = ("max_seq_len", "router_aux_loss_coef")


def read_model_config(model_dir: Path) -> ModelConfig:
    """The ModelConfig of a transformers model directory (GlassboxError if it is not one glassbox can load); of
    a SwiftKV directory, its base model's."""
    from transformers import AutoConfig

    from glassbox.checkpoints.hf_format import model_config_from_hf
    from glassbox.checkpoints.hf_swiftkv import is_swiftkv_dir, swiftkv_configs

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"init_from: {model_dir} has no config.json (not a Hugging Face model directory)")
    if is_swiftkv_dir(model_dir):
        return swiftkv_configs(model_dir)[0]
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"init_from: {model_dir / 'config.json'}: {e}") from None
    return model_config_from_hf(hf_config)


def resolve_init_from(data: dict[str, Any]) -> dict[str, Any]:
    """A raw run-config dict with its `model` section filled from `init_from`'s config.json.

    Fields the config sets itself must agree with the directory, except OVERRIDABLE_MODEL_FIELDS, so that a
    model section written for another shape is an error naming the field rather than silently replaced.
    """
    init_from = data.get("init_from")
    if not init_from:
        return data
    if not isinstance(init_from, str):
        raise ConfigError(f"init_from: expected a model directory path, got {init_from!r}")
    from dataclasses import asdict

    resolved = asdict(read_model_config(Path(init_from)))
    given = data.get("model") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"model: expected a mapping, got {given!r}")
    for key, value in given.items():
        if key in OVERRIDABLE_MODEL_FIELDS or key not in resolved:
            continue        # unknown keys are left for from_dict to reject with its own message
        if value != resolved[key]:
            raise ConfigError(f"model.{key}: {value!r} is set, but init_from {init_from} has {resolved[key]!r} "
                              f"(leave it out; only {', '.join(OVERRIDABLE_MODEL_FIELDS)} may differ)")
    resolved.update({k: v for k, v in given.items() if k in OVERRIDABLE_MODEL_FIELDS})
    return {**data, "model": resolved}


def model_factory(model_dir: Path | str) -> Callable[[ModelConfig], Transformer]:
    """How to build the model `init_from` holds: a plain Transformer, or SwiftKV's with the directory's l and g."""
    from glassbox.checkpoints.hf_swiftkv import is_swiftkv_dir, swiftkv_configs

    if not model_dir or not is_swiftkv_dir(Path(model_dir)):
        return Transformer
    from glassbox.models.swiftkv import SwiftKVTransformer

    swiftkv = swiftkv_configs(Path(model_dir))[1]
    return lambda cfg: SwiftKVTransformer(cfg, swiftkv)


def check_tokenizer(model_dir: Path, tokenizer_files: list[Path]) -> None:
    """Every data source's tokenizer.json must be the model directory's own (byte-identical)."""
    own = Path(model_dir) / "tokenizer.json"
    if not own.is_file():
        return      # a weights-only directory: nothing to compare; the vocabulary bound is checked by the trainer
    digest = sha256_file(own)
    for path in tokenizer_files:
        if sha256_file(path) != digest:
            raise GlassboxError(
                f"init_from: the data at {Path(path).parent} was tokenized with {path}, not with {own}; "
                f"prepare it with `glassbox data prepare --tokenizer {own} ...`")


@torch.no_grad()
def load_pretrained(model: nn.Module, model_dir: Path) -> None:
    """Overwrite every parameter of `model` (as `build_model` returns it: plain, DDP-wrapped or sharded) with the
    directory's weights. Each DTensor keeps the slice its placements give this rank, cut locally from the full
    tensor (`distribute_tensor` with `src_data_rank=None`: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from glassbox.checkpoints.hf_format import read_hf_tensors
    from glassbox.checkpoints.hf_swiftkv import glassbox_state_dict

    inner = unwrap(model)
    weights = glassbox_state_dict(read_hf_tensors(Path(model_dir)), inner.config)
    for name, p in inner.named_parameters():
        if name not in weights:
            raise GlassboxError(f"init_from {model_dir}: no weight for parameter {name!r}")
        full = weights[name]
        if tuple(full.shape) != tuple(p.shape):
            raise GlassboxError(f"init_from {model_dir}: {name} has shape {tuple(full.shape)}, the model "
                                f"{tuple(p.shape)}")
        full = full.to(dtype=p.dtype)
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(full.to(p.device))
