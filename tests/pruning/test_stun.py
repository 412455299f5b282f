"""`glassbox prune` end to end on a trained tiny MoE: STUN and the baselines hit their sparsity and expert counts,
write directories transformers and the engine load with equal outputs, are deterministic, and refuse bad input."""

from __future__ import annotations

import json

import pytest
import torch

from glassbox.checkpoints.hf_format import load_hf_model_dir, read_hf_tensors
from glassbox.cli import main
from glassbox.errors import GlassboxError
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.transformer import ModelConfig, Transformer
from glassbox.pruning.calibration import token_windows
from glassbox.pruning.prune import PruneOptions, prune

CALIB = ("--calib-samples", "16", "--calib-seq-len", "64")


def _prune_cli(method, moe_dir, prepared_data, out, *flags):
    calib = () if method == "random" else ("--calib", str(prepared_data), *CALIB)
    assert main(["prune", method, str(moe_dir), *flags, *calib, "--out", str(out)]) == 0
    return json.loads((out / "pruning.json").read_text())


@pytest.fixture(scope="module")
def stun_dir(moe_dir, prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stun") / "pruned"
    report = _prune_cli("stun", moe_dir, prepared_data, out, "--experts-keep", "0.75", "--sparsity", "0.5")
    return out, report


def test_stun_hits_expert_count_and_total_sparsity(stun_dir):
    out, report = stun_dir
    assert report["experts_before"] == [8, 8]
    assert sum(report["experts_after"]) == 12
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["stage1"]["forward_passes"] == 1 and report["stage2"]["forward_passes"] == 1
    # Every kept expert stands for its own cluster; clusters partition the layer's experts.
    for kept, clusters in zip(report["kept"], report["stage1"]["clusters"]):
        assert sorted(i for c in clusters for i in c) == list(range(8))
        assert all(k in c for k, c in zip(kept, clusters))
    _, cfg = load_hf_model_dir(out)
    assert [cfg.experts_in_layer(i) for i in range(2)] == report["experts_after"]
    assert (out / "tokenizer.json").is_file()


def test_pruned_model_transformers_logits_and_engine_greedy_match(stun_dir):
    from transformers import AutoModelForCausalLM

    out, _ = stun_dir
    ours, cfg = load_hf_model_dir(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=2e-5, rtol=1e-5)
    llm = LLM(out)
    prompts = [llm.tokenizer.encode(p) for p in ("def main():\n", "for key in")]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
    with torch.no_grad():
        for ids, tokens in zip(prompts, got):
            gen = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=12, do_sample=False)
            assert tokens == gen[0, len(ids):].tolist()


@pytest.mark.parametrize("method, flags, experts", [
    ("unstructured", (), 16),
    ("expert-only", ("--similarity", "router"), 8),
    ("random", ("--seed", "3"), 8),
])
def test_baselines_hit_their_sparsity(method, flags, experts, moe_dir, prepared_data, tmp_path):
    report = _prune_cli(method, moe_dir, prepared_data, tmp_path / "out", "--sparsity", "0.5", *flags)
    assert sum(report["experts_after"]) == experts
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_pruning_is_deterministic_for_a_seed(moe_dir, prepared_data, tmp_path):
    model, cfg = load_hf_model_dir(moe_dir)
    windows = token_windows(prepared_data, 16, 64, seed=5, vocab_size=cfg.vocab_size)
    assert torch.equal(windows, token_windows(prepared_data, 16, 64, seed=5, vocab_size=cfg.vocab_size))
    opts = PruneOptions("stun", 0.4, experts_keep=0.8, seed=5, router="mean", owl=True)
    (a, ra), (b, rb) = prune(model, windows, opts), prune(model, windows, opts)
    assert ra.kept == rb.kept
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    r1 = prune(model, windows, PruneOptions("random", 0.5, seed=1))[1].kept
    assert r1 == prune(model, windows, PruneOptions("random", 0.5, seed=1))[1].kept
    assert r1 != prune(model, windows, PruneOptions("random", 0.5, seed=2))[1].kept
    # And the written directory is byte-identical too.
    for name in ("x", "y"):
        _prune_cli("stun", moe_dir, prepared_data, tmp_path / name, "--experts-keep", "0.75", "--sparsity", "0.5")
    ta, tb = read_hf_tensors(tmp_path / "x"), read_hf_tensors(tmp_path / "y")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_bad_input_is_refused_with_a_clear_error(moe_dir, tmp_path, capsys):
    model, _ = load_hf_model_dir(moe_dir)
    windows = torch.zeros(1, 8, dtype=torch.long)
    dense = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=16))
    with pytest.raises(GlassboxError, match="dense"):
        prune(dense, windows, PruneOptions("unstructured", 0.5))
    with pytest.raises(GlassboxError, match="below top-k"):
        prune(model, windows, PruneOptions("expert_only", 0.8))
    for bad in (1.0, -0.1):
        with pytest.raises(GlassboxError, match=r"must be in \[0, 1\)"):
            prune(model, windows, PruneOptions("unstructured", bad))
    with pytest.raises(GlassboxError, match="removes more experts"):
        prune(model, windows, PruneOptions("stun", 0.2, experts_keep=0.5))
    assert main(["prune", "stun", str(moe_dir), "--experts-keep", "0.75", "--sparsity", "1.5",
                 "--calib", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--sparsity 1.5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
