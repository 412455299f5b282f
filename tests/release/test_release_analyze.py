"""`glassbox release analyze` on the tiny release: arrays, plots, card section, and numbers checked independently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import zarr

from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.cli import main

from release_helpers import CHECKPOINT_STEPS, copy_tree


@pytest.fixture(scope="module")
def analyzed(built_release, tmp_path_factory):
    rel = copy_tree(built_release, tmp_path_factory.mktemp("analyzed") / "rel")
    assert main(["release", "analyze", str(rel), "--num-prompts", "6"]) == 0
    return rel


def test_analysis_arrays_plots_and_card(analyzed):
    g = zarr.open_group(analyzed / "model" / "analysis" / "analysis.zarr", mode="r")
    assert g["steps"][:].tolist() == CHECKPOINT_STEPS
    assert g["memorization_per_prompt"].shape == (3, 6)
    assert g["prompts"].shape == (6, 64)
    assert g["weight_norms"].shape == (3, 4)            # embeddings, 2 layers, final norm (tied head)
    assert g["weight_norms"].attrs["columns"] == ["embed_tokens", "layers.0", "layers.1", "norm"]
    mem = g["memorization"][:]
    assert ((0 <= mem) & (mem <= 1)).all()
    index = json.loads((analyzed / "release.json").read_text())
    # perplexity is measured on the same stored validation samples as the build's validation loss
    assert g["perplexity"][:] == pytest.approx([math.exp(b["val_loss"]) for b in index["branches"]], rel=1e-5)
    for plot in ("perplexity.png", "memorization.png", "weight_norms.png"):
        assert (analyzed / "model" / "analysis" / plot).read_bytes()[:4] == b"\x89PNG"
    card = (analyzed / "model" / "README.md").read_text()
    assert "## Analyses" in card and "![memorization.png](analysis/memorization.png)" in card
    assert main(["release", "verify", str(analyzed)]) == 0


@torch.no_grad()
def test_memorization_matches_a_plain_greedy_loop_on_glassbox_model(analyzed):
    """analyze decodes with transformers' KV cache; recompute each token with a full forward of glassbox's model."""
    g = zarr.open_group(analyzed / "model" / "analysis" / "analysis.zarr", mode="r")
    prompts = torch.from_numpy(np.asarray(g["prompts"][:]))
    model, _ = load_hf_model_dir(analyzed / "branches" / "step00000004")
    seq = prompts[:, :32]
    for _ in range(32):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    expected = (seq[:, 32:] == prompts[:, 32:]).float().mean(dim=1).numpy()
    assert g["memorization_per_prompt"][2] == pytest.approx(expected)


def test_weight_norms_match_the_exported_tensors(analyzed):
    from safetensors.torch import load_file

    g = zarr.open_group(analyzed / "model" / "analysis" / "analysis.zarr", mode="r")
    tensors = load_file(analyzed / "branches" / "step00000001" / "model.safetensors")
    layer0 = math.sqrt(sum(t.double().pow(2).sum().item() for k, t in tensors.items()
                           if k.startswith("model.layers.0.")))
    assert g["weight_norms"][0, 1] == pytest.approx(layer0, rel=1e-9)


def test_analyze_refuses_a_tampered_release(built_release, tmp_path, capsys):
    rel = copy_tree(built_release, tmp_path / "rel")
    (rel / "dataset" / "meta.json").write_text("{}")
    assert main(["release", "analyze", str(rel)]) == 2
    assert "does not match its manifest (hash mismatch: dataset/meta.json)" in capsys.readouterr().err
    assert not (rel / "model" / "analysis").exists()
