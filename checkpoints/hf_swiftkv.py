"""SwiftKV models as Hugging Face directories: their own `model_type`, registered with transformers.

A SwiftKV directory is the base Llama directory plus the transform's tensors (`model.swiftkv_norm.weight`,
`model.swiftkv_q_proj.<layer>.weight`, `model.swiftkv_{k,v}_proj.<group start>.weight`) and config fields
`swiftkv_layer`, `swiftkv_group` and `swiftkv_init` (how `convert` initialised the new tensors, a record only),
under model_type `glassbox_swiftkv`. `register()` (run when transformers is imported after `import glassbox`,
glassbox/hf_models.py) adds the config and model classes to transformers' Auto mappings, so
`AutoModelForCausalLM.from_pretrained(dir)` loads it without `trust_remote_code`. The model class is
transformers' Llama with the upper layers' attention replaced; it computes the full sequence each call (no KV
cache: glassbox's engine is the fast path), and with `swiftkv=False` the base model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb, eager_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from glassbox.atomic import staged_dir
from glassbox.checkpoints.hf_format import (
    _write_safetensors,
    DEFAULT_MAX_SHARD_BYTES,
    from_hf_state_dict,
    load_hf_model_dir,
    model_config_from_hf,
    read_hf_tensors,
    to_hf_state_dict,
)
from glassbox.errors import GlassboxError
from glassbox.models.swiftkv import (
    DEFAULT_RIDGE,
    INIT_METHODS,
    SwiftKVConfig,
    SwiftKVTransformer,
    lsq_init,
    swiftkv_from_base,
)
from glassbox.models.transformer import ModelConfig
from glassbox.data.calibration import DEFAULT_CALIB_TOKENS, calibration_tokens

MODEL_TYPE = "glassbox_swiftkv"
ARCHITECTURE = "GlassboxSwiftKVForCausalLM"
# Files of the source directory a converted one keeps as they are (tokenizer, chat template, generation defaults).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json")

CALIB_BATCH = 8             # calibration rows per teacher forward

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SwiftKVLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def __init__(self, swiftkv_layer: int | None = None, swiftkv_group: int = 1, **kwargs):
        self.swiftkv_layer = swiftkv_layer
        self.swiftkv_group = swiftkv_group
        super().__init__(**kwargs)

    def swiftkv(self) -> SwiftKVConfig:
        layer = self.num_hidden_layers if self.swiftkv_layer is None else self.swiftkv_layer
        return SwiftKVConfig(int(layer), int(self.swiftkv_group))


class GlassboxSwiftKVForCausalLM(LlamaForCausalLM):
    config_class = SwiftKVLlamaConfig

    def __init__(self, config: SwiftKVLlamaConfig):
        super().__init__(config)
        skv = config.swiftkv()
        skv.validate(config.num_hidden_layers)
        d, hd = config.hidden_size, config.head_dim
        m = self.model
        m.swiftkv_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        upper = range(skv.layer, config.num_hidden_layers)
        starts = skv.group_starts(config.num_hidden_layers)
        kv = config.num_key_value_heads * hd
        m.swiftkv_q_proj = nn.ModuleDict({str(j): nn.Linear(d, config.num_attention_heads * hd, bias=False)
                                          for j in upper})
        m.swiftkv_k_proj = nn.ModuleDict({str(c): nn.Linear(d, kv, bias=False) for c in starts})
        m.swiftkv_v_proj = nn.ModuleDict({str(c): nn.Linear(d, kv, bias=False) for c in starts})
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, swiftkv: bool = True,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits of the whole sequence (causal, no padding). Cache arguments are ignored: nothing is cached."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"{ARCHITECTURE} takes unpadded sequences only (attention_mask must be all ones)")
        m, cfg = self.model, self.config
        skv = cfg.swiftkv()
        x = m.embed_tokens(input_ids)
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None].expand(B, -1)
        cos, sin = m.rotary_emb(x, position_ids)
        mask = torch.full((T, T), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager_attention_forward)
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, layer in enumerate(m.layers):
            if not swiftkv or j < skv.layer:
                x = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
                continue
            if j == skv.layer:
                n = m.swiftkv_norm(x)
                for c in skv.group_starts(cfg.num_hidden_layers):
                    k = m.swiftkv_k_proj[str(c)](n).view(B, T, -1, cfg.head_dim).transpose(1, 2)
                    v = m.swiftkv_v_proj[str(c)](n).view(B, T, -1, cfg.head_dim).transpose(1, 2)
                    kv[c] = (k, v)
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = m.swiftkv_q_proj[str(j)](h).view(B, T, -1, cfg.head_dim).transpose(1, 2)
            k, v = kv[skv.group_start(j)]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            y, _ = interface(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
            x = x + attn.o_proj(y.reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(m.norm(x))
        return CausalLMOutputWithPast(logits=logits)


def register() -> None:
    """Add SwiftKV's config and model classes to transformers' Auto mappings (once; a second call is a no-op)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, SwiftKVLlamaConfig)
    AutoModelForCausalLM.register(SwiftKVLlamaConfig, GlassboxSwiftKVForCausalLM)


def is_swiftkv_dir(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def _base_hf_config(raw: dict) -> LlamaConfig:
    base = {k: v for k, v in raw.items() if k not in ("swiftkv_layer", "swiftkv_group", "swiftkv_init",
                                                       "model_type", "architectures", "transformers_version")}
    return LlamaConfig(**base)


def swiftkv_configs(path: Path) -> tuple[ModelConfig, SwiftKVConfig]:
    """The base model's config and the transform's, from a SwiftKV directory's config.json."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise GlassboxError(f"{path / 'config.json'}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    cfg = model_config_from_hf(_base_hf_config(raw))
    skv = SwiftKVConfig(int(raw.get("swiftkv_layer", cfg.num_layers)), int(raw.get("swiftkv_group", 1)))
    skv.validate(cfg.num_layers)
    return cfg, skv


def glassbox_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers names -> glassbox's, for a plain Llama/Mixtral directory or a SwiftKV one (whose new tensors
    keep their names without the `model.` prefix)."""
    tensors = dict(tensors)
    new = {k[len("model."):]: tensors.pop(k) for k in list(tensors) if k.startswith("model.swiftkv_")}
    return {**from_hf_state_dict(tensors, cfg), **new}


def load_swiftkv_model_dir(path: Path, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu") -> tuple[SwiftKVTransformer, SwiftKVConfig]:
    """A SwiftKV directory as glassbox's SwiftKVTransformer (base weights and the transform's)."""
    path = Path(path)
    cfg, skv = swiftkv_configs(path)
    sd = {k: v.to(dtype) for k, v in glassbox_state_dict(read_hf_tensors(path, device), cfg).items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    with torch.device("meta"):
        model = SwiftKVTransformer(cfg, skv)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise GlassboxError(f"{path}: weights do not fit the config: {e}") from None
    return model.materialize(device).eval(), skv


def save_swiftkv_model_dir(model: SwiftKVTransformer, out: Path, source_dir: Path, *,
                           dtype: torch.dtype | None = None, init: dict | None = None,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` as a SwiftKV directory, atomically; config fields, tokenizer and generation defaults are
    the source directory's (the one it was converted from), plus the SwiftKV fields; `init` (how convert
    initialised the new tensors) is written as `swiftkv_init`, else the source's is kept (an export)."""
    out, source_dir = Path(out), Path(source_dir)
    if out.resolve() == source_dir.resolve():
        raise GlassboxError(f"--out {out} is the model directory being converted; choose another")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise GlassboxError(f"{out} exists and is not a model directory; choose an empty or new --out")
    cfg, skv = model.config, model.swiftkv
    sd = {k: v for k, v in model.state_dict().items()}
    new = {f"model.{k}": v.detach().contiguous().clone().cpu() for k, v in sd.items() if k.startswith("swiftkv_")}
    base = {k: v for k, v in sd.items() if not k.startswith("swiftkv_")}
    tensors = {**{k: v.cpu() for k, v in to_hf_state_dict(base, cfg.tie_embeddings).items()}, **new}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    raw = json.loads((source_dir / "config.json").read_text())
    raw.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], swiftkv_layer=skv.layer,
               swiftkv_group=skv.group, use_cache=False)
    if init is not None:
        raw["swiftkv_init"] = init
    with staged_dir(out, replace=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        for name in CARRIED_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        _write_safetensors(tmp, tensors, max_shard_bytes)
    return out


def convert(model_dir: Path, layer: int, group: int, out: Path, *, init: str = "copy", calib: str | None = None,
            calib_tokens: int = DEFAULT_CALIB_TOKENS, ridge: float = DEFAULT_RIDGE) -> Path:
    """`glassbox swiftkv convert`: a Llama directory -> its SwiftKV transform (initialised, not yet distilled).
    `init` "copy" is the paper's initialisation; "lsq" then fits the K/V projections on `calib_tokens` tokens of
    `calib` (glassbox.data.calibration). config.json records which, as `swiftkv_init`."""
    model_dir = Path(model_dir)
    if init not in INIT_METHODS:
        raise GlassboxError(f"swiftkv --init {init!r}: expected one of {', '.join(INIT_METHODS)}")
    if init == "copy" and calib:
        raise GlassboxError("swiftkv --calib is for --init lsq (the copy initialisation reads no data)")
    if is_swiftkv_dir(model_dir):
        raise GlassboxError(f"{model_dir} is a SwiftKV model already; convert its base model instead")
    raw = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    if raw.get("model_type") not in (None, "llama"):
        raise GlassboxError(f"{model_dir}: model_type {raw.get('model_type')!r} is not supported by swiftkv "
                            "(a dense Llama-style model: model_type llama)")
    tokens = lsq_calibration(model_dir, calib, calib_tokens) if init == "lsq" else None
    base, cfg = load_hf_model_dir(model_dir)      # in fp32, so that AcrossKV's group means are exact
    skv = SwiftKVConfig(layer, group)
    skv.validate(cfg.num_layers)
    dtype = WEIGHT_DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or "float32", torch.float32)
    model = swiftkv_from_base(base, skv)
    record: dict = {"method": "copy"}
    if tokens is not None:
        used = lsq_init(model, tokens.split(CALIB_BATCH), ridge)
        record = {"method": "lsq", "fitted": ["k_proj", "v_proj"], "calib": str(calib), "calib_tokens": used,
                  "ridge": ridge}
    return save_swiftkv_model_dir(model, out, model_dir, dtype=dtype, init=record)


def lsq_calibration(model_dir: Path, calib: str | None, count: int) -> torch.Tensor:
    """The calibration tokens of `--init lsq`, read before the model is: a bad source fails at once."""
    if not calib:
        raise GlassboxError("swiftkv --init lsq needs --calib: a DATA_DIR from `glassbox swiftkv teacher-data` "
                            "(the distillation's data), or stdlib, or .txt/.jsonl/.parquet files")
    if not (model_dir / "tokenizer.json").is_file():
        raise GlassboxError(f"{model_dir} has no tokenizer.json: --calib text is tokenized with it")
    return calibration_tokens(calib, model_dir / "tokenizer.json", count)


def export_swiftkv_checkpoint(checkpoint: Path, like: Path, out: Path) -> Path:
    """A checkpoint of a run that trained a SwiftKV model (distillation) -> a SwiftKV directory; `like` is the
    directory the run started from, whose l, g, config fields and tokenizer the export keeps."""
    from glassbox.checkpoints.loading import load_view, resolve_checkpoint_path, verified_view
    from glassbox.config import from_dict

    view = verified_view(resolve_checkpoint_path(Path(checkpoint)), True)
    cfg = from_dict(ModelConfig, view.manifest["model"], "model")
    base_cfg, skv = swiftkv_configs(like)
    if (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) != (base_cfg.hidden_size, base_cfg.num_layers,
                                                             base_cfg.vocab_size):
        raise GlassboxError(f"{checkpoint}: the checkpoint's model is not the shape of {like}")
    with torch.device("meta"):
        model = SwiftKVTransformer(cfg, skv)
    model.materialize("cpu")
    load_view(view, model)
    return save_swiftkv_model_dir(model.eval(), out, like)


register()      # on import too: a module importing this one may use the classes through the Auto API at once
