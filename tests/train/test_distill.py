"""SwiftKV distillation as a glassbox run: teacher data from the engine, only the new tensors train, the held-out
KL falls, a resumed run is bit-identical, and the checkpoint exports as a SwiftKV directory."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from glassbox.checkpoints.hf_format import save_hf_model_dir
from glassbox.checkpoints.hf_swiftkv import convert, load_swiftkv_model_dir
from glassbox.cli import main
from glassbox.config import ConfigError
from glassbox.data.sampler import build_sampler
from glassbox.data.store import TokenStore
from glassbox.errors import GlassboxError
from glassbox.models.transformer import ModelConfig, Transformer
from glassbox.train.config import run_config_from_dict
from glassbox.train.distill import (
    DistillConfig,
    DistillObjective,
    distill_losses,
    heldout_kl,
    marker_ids,
    response_mask,
)
from glassbox.train.distill_data import generate_teacher_data, stdlib_prompts
from glassbox.train.trainer import Trainer

MARKER = "assistant:"


@pytest.fixture(scope="module")
def setup(prepared_data, tmp_path_factory):
    """A 4-layer base model (random init) with the prepared data's tokenizer, its teacher data, its SwiftKV
    conversion (l = 2, g = 2)."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(11)
    base = Transformer(ModelConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128, max_seq_len=256, init_std=0.08))
    base_dir = save_hf_model_dir(base, root / "base", tokenizer_json=prepared_data / "tokenizer.json")
    data = generate_teacher_data(base_dir, stdlib_prompts(40), root / "data", max_new_tokens=40,
                                 valid_fraction=0.2)
    skv_dir = convert(base_dir, 2, 2, root / "skv")
    return base_dir, data, skv_dir


def distill_dict(setup, run_dir: Path, **distill) -> dict:
    base_dir, data, skv_dir = setup
    return {
        "init_from": str(skv_dir),
        "model": {"max_seq_len": 64},
        "data": {"path": str(data.data_dir), "seq_len": 64, "seed": 3},
        "distill": {"enabled": True, "response_marker": data.response_marker, **distill},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.0},
        "schedule": {"steps": 16, "warmup_steps": 1},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "checkpoint": {"every": 4},
        "logging": {"val_every": 4, "val_samples": 8, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(run_dir),
    }


def test_teacher_data_is_the_base_models_answers(setup):
    base_dir, data, _ = setup
    # Prompts too long for the 256-token context beside a 40-token answer are left out.
    assert data.response_marker == MARKER and 20 <= data.num_documents <= 40
    assert data.response_tokens > data.num_documents * 20
    docs = [json.loads(line)["text"] for line in data.documents.read_text().splitlines()]
    assert all(d.startswith("user: Explain briefly") and "\nassistant:" in d for d in docs)
    store = TokenStore(data.data_dir)
    assert store.tokenizer_path.read_bytes() == (base_dir / "tokenizer.json").read_bytes()


def test_response_mask_counts_after_the_marker_through_the_end_of_document():
    tokens = torch.tensor([[5, 1, 2, 7, 7, 0, 9, 1, 2, 8]])       # marker [1, 2], end-of-document 0
    got = response_mask(tokens, [1, 2], eod_id=0)
    assert got.tolist() == [[False, False, False, True, True, True, False, False, False, True]]
    assert response_mask(tokens, [], eod_id=0).all()


def test_marker_ids_drop_trailing_whitespace_that_a_bpe_merges_with_the_response(prepared_data):
    tok = TokenStore(prepared_data).tokenizer()
    assert marker_ids(tok, "assistant:\n") == marker_ids(tok, "assistant:") == tok.encode("assistant:").ids
    doc = tok.encode("user: hi\nassistant:\n\n\nreturn x").ids + [0]
    mask = response_mask(torch.tensor([doc]), marker_ids(tok, "assistant:\n"), eod_id=0)
    assert tok.decode([t for t, k in zip(doc, mask[0].tolist()) if k]).endswith("return x")


def test_objective_keeps_its_terms_apart_and_scores_held_out_kl(setup):
    """The step's KL and MSE terms are the row-weighted means the loss combines; the validation sums are the
    held-out KL at T = 1 over response tokens."""
    base_dir, data, skv_dir = setup
    model, _ = load_swiftkv_model_dir(skv_dir)
    store = TokenStore(data.data_dir)
    marker = marker_ids(store.tokenizer(), data.response_marker)
    cfg = DistillConfig(enabled=True, hidden_mse_weight=0.5, response_marker=data.response_marker)
    objective = DistillObjective(cfg, marker, store.eod_id, contextlib.nullcontext)
    samples = build_sampler(run_config_from_dict(distill_dict(setup, Path("unused"))).data, "train").samples(0, 6)
    chunks = [samples[:4], samples[4:]]
    losses = [objective(model, c) for c in chunks]
    terms = [distill_losses(model, c, response_mask(c[:, 1:], marker, store.eod_id), cfg, contextlib.nullcontext)
             for c in chunks]
    want = sum(torch.stack(t) * c.shape[0] for t, c in zip(terms, chunks)) / 6
    torch.testing.assert_close(objective.step_terms(), want)
    for loss, (kl, mse) in zip(losses, terms):
        torch.testing.assert_close(loss, kl + 0.5 * mse)
    with pytest.raises(GlassboxError, match="step_terms called before any micro-batch"):
        objective.step_terms()
    held_out = build_sampler(run_config_from_dict(distill_dict(setup, Path("unused"))).data, "valid").samples(0, 8)
    total, count = objective.validation_sums(model, held_out, batch=3).tolist()
    assert count == int(response_mask(held_out[:, 1:], marker, store.eod_id).sum()) > 0
    assert total / count == pytest.approx(heldout_kl(model, held_out, marker, store.eod_id), rel=1e-9)


def test_distillation_trains_only_the_new_tensors_and_lowers_heldout_kl(setup, tmp_path):
    base_dir, data, skv_dir = setup
    cfg = run_config_from_dict(distill_dict(setup, tmp_path / "run"))
    store = TokenStore(data.data_dir)
    marker = marker_ids(store.tokenizer(), data.response_marker)
    held_out = build_sampler(cfg.data, "valid").samples(0, 16)
    before, _ = load_swiftkv_model_dir(skv_dir)
    kl_before = heldout_kl(before, held_out, marker, store.eod_id)
    trainer = Trainer(cfg)
    trainer.fit()
    after = trainer.state.model.eval()
    kl_after = heldout_kl(after, held_out, marker, store.eod_id)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    # Metrics: both terms of every step's loss, and the held-out KL (T = 1) as the validation metric.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["loss"] == pytest.approx(row["kl"] + cfg.distill.hidden_mse_weight * row["hidden_mse"])
    assert [r["step"] for r in rows if "val_kl" in r] == [4, 8, 12, 16]
    assert not any("val_loss" in r for r in rows)
    assert rows[-1]["val_kl"] == pytest.approx(heldout_kl(after, trainer.val_tokens, marker, store.eod_id))
    for name, p in before.state_dict().items():
        same = torch.equal(p, after.state_dict()[name])
        assert same != name.startswith("swiftkv_"), name
    # The checkpoint exports as a SwiftKV directory the engine and transformers load, with the trained tensors.
    out = tmp_path / "export"
    assert main(["swiftkv", "export", "--checkpoint", str(tmp_path / "run"), "--like", str(skv_dir),
                 "--out", str(out)]) == 0
    exported, _ = load_swiftkv_model_dir(out)
    # The generic export would write the base model alone: it refuses, naming the SwiftKV one.
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "plain")]) == 2
    assert not (tmp_path / "plain").exists()
    for name, p in after.state_dict().items():
        assert torch.equal(exported.state_dict()[name], p), name


def test_resumed_distillation_is_bit_identical(setup, tmp_path):
    straight = Trainer(run_config_from_dict(distill_dict(setup, tmp_path / "a", hidden_mse_weight=0.5)))
    straight.fit()
    first = Trainer(run_config_from_dict(distill_dict(setup, tmp_path / "b", hidden_mse_weight=0.5)))
    for cb in first.callbacks:
        cb.on_train_start(first.state)
    for _ in range(5):                                   # saved at step 4; step 5 dies with the process
        first.train_step()
        for cb in first.callbacks:
            cb.on_step_end(first.state)
    del first
    d = distill_dict(setup, tmp_path / "b", hidden_mse_weight=0.5)
    d["checkpoint"]["resume"] = "auto"
    resumed = Trainer(run_config_from_dict(d))
    resumed.fit()

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["loss"], r["kl"], r["hidden_mse"], r.get("val_kl")) for r in rows]

    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 16
    for (name, x), y in zip(straight.state.model.named_parameters(), resumed.state.model.parameters()):
        assert torch.equal(x, y), name


def test_distill_config_errors(setup, tmp_path):
    d = distill_dict(setup, tmp_path / "r")
    del d["init_from"]
    d["model"] = {}
    with pytest.raises(ConfigError, match="distill.enabled: a distillation run starts from a SwiftKV model"):
        run_config_from_dict(d)
    with pytest.raises(ConfigError, match="distill.temperature: must be positive"):
        run_config_from_dict(distill_dict(setup, tmp_path / "r", temperature=0))
