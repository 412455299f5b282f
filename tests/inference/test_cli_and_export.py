"""`glassbox generate` / `glassbox serve` on a directory written by glassbox's own exporter."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from glassbox.checkpoints.hf_format import save_hf_model_dir
from glassbox.cli import main
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.transformer import ModelConfig, Transformer


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_json):
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128, init_std=0.08)
    model = Transformer(cfg).eval()
    out = save_hf_model_dir(model, tmp_path_factory.mktemp("export") / "hf", tokenizer_json)
    return model, out


def test_exported_glassbox_model_matches_its_own_forward(exported):
    model, path = exported
    llm = LLM(path)
    ids = llm.tokenizer.encode("def main():")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    ref = list(ids)
    with torch.no_grad():
        for _ in range(16):
            ref.append(int(model(torch.tensor([ref]))[0, -1].argmax()))
    assert out.token_ids == ref[len(ids):]


def test_generate_command(exported, capsys):
    _, path = exported
    assert main(["generate", str(path), "--prompt", "import os", "--prompt", "x = ", "--max-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("import os") and lines[2].startswith("x = ")
    assert sum("--- finish:" in line for line in lines) == 2


def test_generate_command_bad_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_serve_command(exported):
    _, path = exported
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glassbox.cli", "serve", str(path), "--port", str(port),
                             "--api-key", "k", "--served-model-name", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        resp = client.completions.create(model="demo", prompt="def f():", max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
