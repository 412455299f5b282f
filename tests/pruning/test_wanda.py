"""Wanda's inputs and OWL's ratios: the input norms weight each routed token by its routing weight (checked
against a token-by-token computation that shares no code with the calibration pass), and OWL's per-layer
sparsities keep their size-weighted mean when some would fall outside [0, 0.99]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.pruning.calibration import token_windows
from glassbox.pruning.moe_stats import collect_stats
from glassbox.pruning.wanda import MAX_SPARSITY, owl_ratios, owl_spread


def _moe_inputs(model, windows) -> list[torch.Tensor]:
    """Per layer, the [tokens, hidden] states its MoE routes, from one plain forward."""
    inputs: list[torch.Tensor] = [torch.empty(0)] * len(model.layers)

    def hook_for(i):
        def hook(module, args):
            inputs[i] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
        return hook

    handles = [layer.mlp.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return inputs


@torch.no_grad()
def _brute_force_norms(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over tokens of w^2 h^2 and w^2 act^2 per expert, one token and one chosen expert at a time."""
    E, f, d = moe.gate_proj.shape
    input_sq = torch.zeros(E, d, dtype=torch.float64)
    hidden_sq = torch.zeros(E, f, dtype=torch.float64)
    for h in x.double():
        probs = torch.softmax(moe.router.weight.double() @ h, dim=-1)
        top = sorted(range(E), key=lambda e: -float(probs[e]))[:moe.top_k]
        total = sum(float(probs[e]) for e in top)
        for e in top:
            w = float(probs[e]) / total
            act = F.silu(moe.gate_proj[e].double() @ h) * (moe.up_proj[e].double() @ h)
            input_sq[e] += w ** 2 * h ** 2
            hidden_sq[e] += w ** 2 * act ** 2
    return input_sq, hidden_sq


@pytest.fixture(scope="module")
def model_and_windows(moe_dir, prepared_data):
    model, cfg = load_hf_model_dir(moe_dir, dtype=torch.float32)
    return model, token_windows(prepared_data, 3, 24, seed=4, vocab_size=cfg.vocab_size)


def test_wanda_input_norms_weight_each_token_by_its_routing_weight(model_and_windows):
    model, windows = model_and_windows
    stats = collect_stats(model, windows, batch_size=2)
    for layer, x, st in zip(model.layers, _moe_inputs(model, windows), stats):
        input_sq, hidden_sq = _brute_force_norms(layer.mlp, x)
        torch.testing.assert_close(st.input_sq.cpu(), input_sq, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(st.hidden_sq.cpu(), hidden_sq, rtol=1e-4, atol=1e-8)
        assert int(st.coselect.diagonal().sum()) == x.shape[0] * layer.mlp.top_k


def _size_weighted_mean(ratios: list[float], sizes: list[int]) -> float:
    return sum(r * n for r, n in zip(ratios, sizes)) / sum(sizes)


@pytest.mark.parametrize("sparsity", [0.0, 0.03, 0.1, 0.5, 0.95, 0.985])
def test_owl_ratios_keep_their_mean_inside_the_bounds(sparsity):
    outliers = [0.0, 0.002, 0.01, 0.03, 0.004]
    sizes = [4096, 1024, 3072, 2048, 512]
    ratios = owl_spread(outliers, sizes, sparsity, lam=0.08)
    assert all(0.0 <= r <= MAX_SPARSITY for r in ratios)
    assert _size_weighted_mean(ratios, sizes) == pytest.approx(sparsity, abs=1e-12)
    order = sorted(range(5), key=lambda i: outliers[i])              # more outliers, never a higher sparsity
    assert all(ratios[a] >= ratios[b] for a, b in zip(order, order[1:]))


def test_owl_ratios_inside_the_bounds_are_the_plain_owl_spread():
    outliers, sizes, lam = [0.0, 0.01, 0.02], [100, 300, 600], 0.08
    spread = [0.0, lam, 2 * lam]
    mean_spread = _size_weighted_mean(spread, sizes)
    assert owl_spread(outliers, sizes, 0.4, lam) == pytest.approx([0.4 - s + mean_spread for s in spread], abs=1e-12)


def test_owl_ratios_of_the_model_keep_their_mean_where_a_layer_would_clamp(model_and_windows):
    model, windows = model_and_windows
    stats = collect_stats(model, windows, batch_size=2)
    sizes = [3 * layer.mlp.gate_proj.numel() for layer in model.layers]
    ratios = owl_ratios(model, stats, 0.05)
    assert min(ratios) == 0.0                                        # clamped: a plain clamp would break the mean
    assert _size_weighted_mean(ratios, sizes) == pytest.approx(0.05, abs=1e-12)
