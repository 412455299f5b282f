"""glassbox weights <-> Hugging Face transformers format (LlamaForCausalLM for dense, MixtralForCausalLM for MoE).

An MoE whose layers differ in expert count or top-k (an expert-pruned model) is written as glassbox's own
`glassbox_moe` type (glassbox.models.hf_moe): Mixtral's math, names and weight layout plus per-layer counts in
config.json; transformers loads it after `import glassbox`. Uniform counts stay plain Mixtral.

glassbox's Transformer keeps transformers' module names and math, so conversion is a renaming plus, for MoE, a
change of expert layout: glassbox stacks each expert weight into one 3-D tensor ([experts, out, in]); the
Mixtral checkpoint format on disk has one 2-D tensor per expert (`block_sparse_moe.experts.E.w1/w2/w3`, gate,
down, up). That per-expert layout is what transformers 5 itself writes (it fuses gate and up into
`mlp.experts.gate_up_proj` only in memory) and what transformers 4, vLLM and llama.cpp read, so exports use it.
Import accepts both the per-expert layout and the fused in-memory layout.

An export directory holds config.json, model.safetensors (or shards plus model.safetensors.index.json),
generation_config.json and, given a tokenizer, tokenizer.json + tokenizer_config.json: `from_pretrained` and
`AutoTokenizer.from_pretrained` load it offline, and the inference engine loads it with `load_hf_model_dir`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from glassbox.atomic import staged_dir
from glassbox.distributed import full_tensor, is_main_process
from glassbox.errors import GlassboxError
from glassbox.models.transformer import ModelConfig, Transformer
from glassbox.models.transformer import unwrap

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Per-layer tensors whose names are the same on both sides (after the `layers.N.` / `model.layers.N.` prefix).
_SHARED_LAYER_KEYS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
_DENSE_MLP_KEYS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
# glassbox MoE tensor -> Mixtral's per-expert name (w1 = gate, w2 = down, w3 = up).
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise GlassboxError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default' rotary)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise GlassboxError("config.json has no rope_theta")
    return float(theta)


def hf_config_from(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                   dtype: torch.dtype = torch.float32) -> Any:
    """The transformers config whose model computes exactly what glassbox's Transformer computes."""
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    if cfg.is_moe:
        moe = dict(
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            router_jitter_noise=0.0,
            output_router_logits=False,
            sliding_window=None,
        )
        experts = [cfg.experts_in_layer(i) for i in range(cfg.num_layers)]
        top_k = [cfg.top_k_in_layer(i) for i in range(cfg.num_layers)]
        if cfg.uniform_experts:
            hf = MixtralConfig(**common, **moe, num_local_experts=experts[0], num_experts_per_tok=top_k[0])
            hf.architectures = ["MixtralForCausalLM"]
        else:
            from glassbox.models.hf_moe_config import GlassboxMoeConfig

            hf = GlassboxMoeConfig(**common, **moe, num_local_experts=max(experts), num_experts_per_tok=max(top_k),
                                   num_local_experts_per_layer=experts, num_experts_per_tok_per_layer=top_k)
            hf.architectures = ["GlassboxMoeForCausalLM"]
    else:
        hf = LlamaConfig(**common, attention_bias=False, mlp_bias=False, pretraining_tp=1)
        hf.architectures = ["LlamaForCausalLM"]
    hf.dtype = dtype
    return hf


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """glassbox's ModelConfig for a Llama, Mixtral or glassbox_moe config; anything whose math differs from ours
    is refused."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("llama", "mixtral", "glassbox_moe"):
        raise GlassboxError(
            f"model_type {model_type!r} is not supported (glassbox reads llama, mixtral and glassbox_moe)")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise GlassboxError(f"hidden_act {hf_config.hidden_act!r} is not supported (glassbox uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise GlassboxError(f"{flag}=true is not supported (glassbox's projections have no bias)")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if head_dim * heads != hf_config.hidden_size:
        raise GlassboxError(
            f"head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hf_config.hidden_size} "
            "(glassbox needs head_dim = hidden_size / heads)"
        )
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and window < hf_config.max_position_embeddings:
        raise GlassboxError(f"sliding_window {window} is not supported (glassbox attends to the full context)")
    kwargs = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        intermediate_size=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )
    if model_type in ("mixtral", "glassbox_moe"):
        kwargs.update(
            num_experts=hf_config.num_local_experts,
            experts_per_token=hf_config.num_experts_per_tok,
            router_aux_loss_coef=hf_config.router_aux_loss_coef,
        )
    if model_type == "glassbox_moe":
        kwargs.update(layer_num_experts=list(hf_config.num_local_experts_per_layer),
                      layer_experts_per_token=list(hf_config.num_experts_per_tok_per_layer))
    cfg = ModelConfig(**kwargs)
    cfg.validate()
    return cfg


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def to_hf_state_dict(glassbox_state_dict: dict[str, torch.Tensor],
                     tie_embeddings: bool | None = None) -> dict[str, torch.Tensor]:
    """Rename (and for MoE, split per expert) a Transformer's state dict into transformers' on-disk names.

    Tied embeddings write no `lm_head.weight` (transformers re-ties it from config.json). `tie_embeddings=None`
    infers tying: the lm head is missing or shares storage with the embedding, as in a live tied model.
    Every returned tensor is contiguous and owns its storage, as safetensors requires.
    """
    sd = glassbox_state_dict
    if tie_embeddings is None:
        tie_embeddings = "lm_head.weight" not in sd or _shares_storage(sd["lm_head.weight"], sd["embed_tokens.weight"])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        tensor = tensor.detach()
        if name == "lm_head.weight":
            if not tie_embeddings:
                out[name] = tensor
            continue
        if name in ("embed_tokens.weight", "norm.weight"):
            out[f"model.{name}"] = tensor
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            raise GlassboxError(f"unexpected tensor {name!r} in a glassbox state dict")
        layer, rest = m.groups()
        prefix = f"model.layers.{layer}."
        if rest in _SHARED_LAYER_KEYS or rest in _DENSE_MLP_KEYS:
            out[prefix + rest] = tensor
        elif rest == "mlp.router.weight":
            out[prefix + "block_sparse_moe.gate.weight"] = tensor
        elif rest.startswith("mlp.") and rest[4:] in _EXPERT_NAMES:
            w = _EXPERT_NAMES[rest[4:]]
            for e in range(tensor.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.{w}.weight"] = tensor[e]
        else:
            raise GlassboxError(f"unexpected tensor {name!r} in a glassbox state dict")
    return {k: v.contiguous().clone() for k, v in out.items()}


def _expert_tensors(hf: dict[str, torch.Tensor], prefix: str, num_experts: int,
                    cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's experts as glassbox's stacked tensors, from the per-expert or the fused layout."""
    moe = prefix + "block_sparse_moe."
    fused = prefix + "mlp.experts."
    if fused + "gate_up_proj" in hf:
        gate_up = hf.pop(fused + "gate_up_proj")
        gate, up = gate_up.split(cfg.intermediate_size, dim=1)
        return {"gate_proj": gate, "up_proj": up, "down_proj": hf.pop(fused + "down_proj")}
    stacked = {}
    for ours, theirs in _EXPERT_NAMES.items():
        keys = [f"{moe}experts.{e}.{theirs}.weight" for e in range(num_experts)]
        missing = [k for k in keys if k not in hf]
        if missing:
            raise GlassboxError(f"missing tensor {missing[0]!r} in the Hugging Face weights")
        stacked[ours] = torch.stack([hf.pop(k) for k in keys])
    return stacked


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: transformers names -> a state dict `Transformer(cfg)` loads strictly.

    A tied config maps `lm_head.weight` to the embedding tensor itself. Tensors transformers keeps but glassbox
    recomputes (`rotary_emb.inv_freq`) are dropped; any other unknown or missing tensor is an error naming it.
    """
    hf = {k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise GlassboxError(f"missing tensor {key!r} in the Hugging Face weights")
        return hf.pop(key)

    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        for rest in _SHARED_LAYER_KEYS:
            sd[f"layers.{i}.{rest}"] = take(prefix + rest)
        if cfg.is_moe:
            router = prefix + "block_sparse_moe.gate.weight"
            sd[f"layers.{i}.mlp.router.weight"] = take(router if router in hf else prefix + "mlp.gate.weight")
            for ours, tensor in _expert_tensors(hf, prefix, cfg.experts_in_layer(i), cfg).items():
                sd[f"layers.{i}.mlp.{ours}"] = tensor.contiguous()
        else:
            for rest in _DENSE_MLP_KEYS:
                sd[f"layers.{i}.{rest}"] = take(prefix + rest)
    sd["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        # transformers ignores a stored lm_head when the config ties it; so do we.
        hf.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = take("lm_head.weight")
    if hf:
        raise GlassboxError(f"unexpected tensor {sorted(hf)[0]!r} in the Hugging Face weights")
    return sd


def _full_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """A Transformer's tensors, gathering DTensor shards (every rank of a sharded model must call this)."""
    return {name: full_tensor(t) for name, t in model.state_dict().items()}


def _eod_token(tokenizer_json: Path) -> tuple[str | None, int | None]:
    """The end-of-text token: meta.json's `eod_id` beside the tokenizer if present, else its first special token."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    meta = tokenizer_json.with_name("meta.json")
    if meta.is_file():
        eod_id = json.loads(meta.read_text()).get("eod_id")
        if eod_id is not None:
            return tok.id_to_token(int(eod_id)), int(eod_id)
    for added in json.loads(tokenizer_json.read_text()).get("added_tokens", []):
        if added.get("special"):
            return added["content"], int(added["id"])
    return None, None


def _special_token_ids(tokenizer_json: Path, eod_id: int | None) -> dict[str, Any]:
    """bos/eos/pad ids for config.json and generation_config.json: the end-of-text token for all three, unless the
    checkpoint carries a base model's tokenizer config (init_from): then the base's tokens, with the data's
    end-of-text as a second eos (the run's documents end with it)."""
    carried = tokenizer_json.with_name("tokenizer_config.json")
    if not carried.is_file():
        return {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id}
    from tokenizers import Tokenizer

    tok, config = Tokenizer.from_file(str(tokenizer_json)), json.loads(carried.read_text())

    def token_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return tok.token_to_id(token) if isinstance(token, str) else None

    eos = [i for i in dict.fromkeys([token_id("eos_token"), eod_id]) if i is not None]
    bos, pad = token_id("bos_token"), token_id("pad_token")
    return {"bos_token_id": eod_id if bos is None else bos,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": eod_id if pad is None else pad}


def _write_tokenizer(tmp: Path, tokenizer_json: Path, eod: str | None, max_len: int) -> None:
    shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    carried = tokenizer_json.with_name("tokenizer_config.json")
    if carried.is_file():
        # A run from a pretrained directory: its chat template and special tokens, as the base declared them.
        config: dict[str, Any] = json.loads(carried.read_text())
        config["model_max_length"] = max_len
        template = tokenizer_json.with_name("chat_template.jinja")
        if template.is_file():
            shutil.copyfile(template, tmp / template.name)
    else:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }
        if eod is not None:
            config.update(bos_token=eod, eos_token=eod, pad_token=eod)
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_safetensors(tmp: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_hf_model_dir(model: torch.nn.Module, out: Path, tokenizer_json: Path | None = None, *,
                      dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` as a transformers model directory at `out`, atomically (built aside, then renamed).

    `dtype` casts the weights (default: as they are). A sharded (FSDP2 / tensor-parallel) model is gathered, so
    every rank must call this; only rank 0 writes. An existing `out` is replaced only if it is an export already.
    """
    out = Path(out)
    inner = unwrap(model)
    cfg = inner.config
    sd = _full_state_dict(inner)
    if not is_main_process():
        return out
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise GlassboxError(f"{out} exists and is not a model directory; choose an empty or new --out")
    tensors = to_hf_state_dict(sd, tie_embeddings=cfg.tie_embeddings)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    weight_dtype = next(iter(tensors.values())).dtype
    eod, eod_id = _eod_token(Path(tokenizer_json)) if tokenizer_json is not None else (None, None)
    special = (_special_token_ids(Path(tokenizer_json), eod_id) if tokenizer_json is not None else
               {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    hf = hf_config_from(cfg, bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                        dtype=weight_dtype)
    with staged_dir(out, replace=True) as tmp:
        hf.save_pretrained(tmp)
        generation = special
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if tokenizer_json is not None:
            _write_tokenizer(tmp, Path(tokenizer_json), eod, cfg.max_seq_len)
        _write_safetensors(tmp, tensors, max_shard_bytes)
    return out


def read_hf_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors files (sharded through the index, or single)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise GlassboxError(f"no *.safetensors weights in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise GlassboxError(f"{fpath} is listed in {index.name} but missing")
        try:
            tensors.update(load_file(fpath, device=str(device)))
        except Exception as e:     # safetensors raises its own error types for truncated or corrupt files
            raise GlassboxError(f"{fpath}: cannot read safetensors ({e})") from None
    return tensors


def load_hf_model_dir(path: Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> tuple[Transformer, ModelConfig]:
    """Load a transformers Llama/Mixtral directory (config.json + *.safetensors) into glassbox's Transformer.

    The model is built on the meta device and its parameters assigned from the files, so nothing is
    initialised twice; the rotary table is recomputed in fp32 on `device`.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise GlassboxError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise GlassboxError(f"{path / 'config.json'}: {e}") from None
    cfg = model_config_from_hf(hf_config)
    sd = from_hf_state_dict(read_hf_tensors(path, device), cfg)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise GlassboxError(f"{path}: weights do not fit the config: {e}") from None
    return model.materialize(device).eval(), cfg
