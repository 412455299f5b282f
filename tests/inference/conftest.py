"""Tiny random-init Llama and Mixtral model directories written by transformers itself, with a byte-level BPE
tokenizer trained on standard-library source, so engine outputs can be compared with transformers' own."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from infer_helpers import one_thread

EOS = "<|endoftext|>"
VOCAB = 512


def _train_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / name) for name in ("textwrap.py", "string.py", "shlex.py", "glob.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def _write_model_dir(out: Path, tokenizer_json: Path, moe: bool, chat_template: str | None = None) -> Path:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    eos_id = Tokenizer.from_file(str(tokenizer_json)).token_to_id(EOS)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.08, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=False)
    torch.manual_seed(1234 if moe else 4321)
    if moe:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
              "model_max_length": 256}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_json) -> Path:
    return _write_model_dir(tmp_path_factory.mktemp("llama"), tokenizer_json, moe=False)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, tokenizer_json) -> Path:
    return _write_model_dir(tmp_path_factory.mktemp("mixtral"), tokenizer_json, moe=True)


PROMPTS = [
    "def wrap(text, width=70):",
    "import os",
    "class TextWrapper:\n    \"\"\"Object for wrapping/filling text.",
    "x",
    "    def __init__(self, width=70, initial_indent=\"\", subsequent_indent=\"\"):",
    "# Copyright 2001 Python Software Foundation.",
    "def glob(pathname, *, root_dir=None, dir_fd=None, recursive=False):\n    return list(",
    "return ''.join(chunks)",
    "def wrap(text, width=70): return",
    "import sys",
    "for chunk in chunks:\n        if chunk.strip()",
    "s = shlex.split(",
    "def split(s, comments=False, posix=True):",
    "lexer = shlex(s, posix=posix)",
    "whitespace = ' \\t\\n\\r\\v\\f'",
    "ascii_letters = ascii_lowercase + ascii_uppercase",
]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)
