"""The engine's persistent compile cache: keys that change with what gets compiled, bad entries ignored with a
warning, and a real save in one process that a second process loads so that its compile hits torch's cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glassbox.config import ConfigError
from glassbox.inference.compile_cache import CompileCache, compile_cache_for, default_root, engine_sizes, key_fields
from glassbox.inference.engine import EngineConfig

SIZES = {"num_blocks": 64, "block_size": 16, "max_model_len": 256, "max_num_seqs": 8, "cuda_graphs": True}
MODEL = {"dim": 64, "n_layers": 2, "vocab_size": 512}


def _fields(**change) -> dict:
    fields = key_fields(MODEL, "Transformer", torch.float32, torch.device("cpu"), SIZES)
    return {**fields, **change}


def test_the_key_names_everything_that_decides_the_compile(tmp_path):
    base = CompileCache(tmp_path, _fields()).key
    assert CompileCache(tmp_path, _fields()).key == base
    changed = [_fields(dtype=str(torch.bfloat16)), _fields(sizes={**SIZES, "max_num_seqs": 16}),
               _fields(model_config={**MODEL, "n_layers": 3}), _fields(torch="9.9.9"), _fields(device_name="H200"),
               _fields(model_class="SwiftKVTransformer")]
    keys = {CompileCache(tmp_path, f).key for f in changed}
    assert base not in keys and len(keys) == len(changed)


def test_how_the_decode_graphs_compile_is_part_of_the_key():
    per_size, dynamic = (engine_sizes(EngineConfig(compile=True, graph_compile=m), 64, 256)
                         for m in ("per_size", "dynamic"))
    assert per_size != dynamic and {k for k in per_size if per_size[k] != dynamic[k]} == {"graph_compile"}
    fused, separate = (engine_sizes(EngineConfig(compile=True, fuse_projections=f), 64, 256) for f in (True, False))
    assert {k for k in fused if fused[k] != separate[k]} == {"fuse_projections"}
    with pytest.raises(ConfigError, match="engine.graph_compile: must be per_size or dynamic"):
        EngineConfig(graph_compile="static")


def test_default_location_and_config_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("GLASSBOX_COMPILE_CACHE", str(tmp_path / "cc"))
    assert default_root() == tmp_path / "cc"
    monkeypatch.delenv("GLASSBOX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "glassbox" / "compile"
    with pytest.raises(ConfigError, match="compile_cache_dir"):
        EngineConfig(compile_cache_dir=3)
    with pytest.raises(ConfigError, match="compile_cache"):
        EngineConfig(compile_cache="yes")


def test_without_compile_the_cache_is_off(tmp_path):
    cfg = EngineConfig(compile=False, compile_cache_dir=str(tmp_path))
    with compile_cache_for(cfg, torch.nn.Linear(2, 2), 8, 64) as startup:
        pass
    assert startup.compile_cache == "off" and startup.compiled_graphs == 0 and not any(tmp_path.iterdir())


def _write_entry(cache: CompileCache, blob: bytes, meta: dict | None) -> None:
    cache.path.mkdir(parents=True)
    (cache.path / "artifacts.bin").write_bytes(blob)
    if meta is not None:
        (cache.path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", ["no_meta", "bad_hash", "other_settings", "junk_blob"])
def test_a_bad_entry_is_ignored_with_a_warning(tmp_path, caplog, case):
    import hashlib

    cache = CompileCache(tmp_path, _fields())
    blob = b"\x00 not torch's artifacts \xff" * 10
    meta = {"fields": cache.fields, "sha256": hashlib.sha256(blob).hexdigest()}
    if case == "bad_hash":
        meta["sha256"] = "0" * 64
    elif case == "other_settings":
        meta["fields"] = CompileCache(tmp_path, _fields(dtype="torch.float16")).fields
    _write_entry(cache, blob, None if case == "no_meta" else meta)
    with caplog.at_level(logging.WARNING, logger="glassbox.inference.compile_cache"):
        assert cache.load() is False
    assert cache.state == "ignored"
    assert str(cache.path) in caplog.text and "ignored" in caplog.text
    assert CompileCache(tmp_path / "empty", _fields()).load() is False       # no entry: a plain miss, no warning


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from torch._dynamo.utils import counters
    from glassbox.inference.compile_cache import CompileCache, key_fields
    torch.set_num_threads(1)
    cache = CompileCache(Path(sys.argv[1]), key_fields({"probe": 1}, "probe", torch.float32, torch.device("cpu"), {}))
    loaded = cache.load()
    f = torch.compile(lambda x, w: torch.nn.functional.silu(x @ w).sum(-1))
    f(torch.randn(4, 8), torch.randn(8, 8))
    saved = cache.save() if not loaded else False
    print(json.dumps({"loaded": loaded, "saved": saved, "state": cache.state,
                      "miss": counters["inductor"]["fxgraph_cache_miss"], "hit": counters["inductor"]["fxgraph_cache_hit"]}))
""")


def test_a_second_process_loads_the_first_ones_graphs(tmp_path):
    """Each process has its own empty inductor cache folder, so the only way the second can hit is the entry."""
    def run(name: str) -> dict:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{name}")}
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cache")], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = run("cold")
    assert cold == {"loaded": False, "saved": True, "state": "miss", "miss": 1, "hit": 0}
    warm = run("warm")
    assert warm["loaded"] and warm["state"] == "hit" and warm["miss"] == 0 and warm["hit"] >= 1
    entry = next(Path(tmp_path / "cache").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["artifacts.bin", "meta.json"]


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.llm import LLM
    from glassbox.inference.sampling_params import SamplingParams
    cfg = EngineConfig(device="cuda", compile=True, compile_cache_dir=sys.argv[2], max_num_seqs=4, num_kv_blocks=256)
    engine = LLMEngine.from_model_dir(sys.argv[1], cfg)
    out = LLM(engine=engine).generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0, max_tokens=12))
    s = engine.startup
    print(json.dumps({"state": s.compile_cache, "compiled": s.compiled_graphs, "seconds": s.seconds,
                      "tokens": [o.outputs[0].token_ids for o in out]}))
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_warm_engine_start_on_cuda_compiles_nothing_new(llama_dir, tmp_path):
    def start(name: str) -> dict:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{name}")}
        done = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(llama_dir), str(tmp_path / "cache")],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold, warm = start("cold"), start("warm")
    assert cold["state"] == "miss" and cold["compiled"] > 0
    assert warm["state"] == "hit" and warm["compiled"] == 0, warm
    assert warm["tokens"] == cold["tokens"]
    print(f"engine start with compile: cold {cold['seconds']} s, warm {warm['seconds']} s")
