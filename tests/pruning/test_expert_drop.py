"""Dropping experts is exactly router masking: a pruned model's logits equal the unpruned model's with the dropped
experts' router logits set to -inf (an oracle that runs no pruning code), through every method's path and through
the written directory; an expert the router never picks costs nothing and is the first the weighted distance drops.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.models.transformer import Transformer
from glassbox.pruning.calibration import token_windows
from glassbox.pruning.expert_clustering import cheapest_keeper, global_clusters
from glassbox.pruning.expert_drop import drop_experts
from glassbox.pruning.expert_similarity import coselection_distance, output_weighted_distance
from glassbox.pruning.moe_stats import collect_stats
from glassbox.pruning.output import write_pruned_dir
from glassbox.pruning.prune import PruneOptions, prune


@contextmanager
def masked(model: Transformer, dropped: list[list[int]]):
    """The oracle: `model` with router logit -inf for layer i's experts `dropped[i]` (Mixtral's softmax over all
    experts then gives them probability 0, so top-k and its renormalisation see only the others)."""
    def hook_for(ids):
        def hook(module, args, out):
            out = out.clone()
            out[..., ids] = float("-inf")
            return out
        return hook

    handles = [layer.mlp.router.register_forward_hook(hook_for(ids))
               for layer, ids in zip(model.layers, dropped) if ids]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _dropped(model: Transformer, kept: list[list[int]]) -> list[list[int]]:
    return [sorted(set(range(layer.mlp.num_experts)) - set(k)) for layer, k in zip(model.layers, kept)]


@pytest.fixture(scope="module")
def model_and_data(moe_dir, prepared_data):
    model, cfg = load_hf_model_dir(moe_dir, dtype=torch.float32)
    calib = token_windows(prepared_data, 16, 64, seed=0, vocab_size=cfg.vocab_size)
    x = token_windows(prepared_data, 4, 48, seed=1, vocab_size=cfg.vocab_size, split="valid")
    return model, calib, x


@torch.no_grad()
def test_dropping_any_single_expert_equals_masking_its_router_logit(model_and_data):
    model, _, x = model_and_data
    E = model.layers[0].mlp.num_experts
    for layer in range(len(model.layers)):
        for e in range(E):
            kept = [list(range(E)) for _ in model.layers]
            kept[layer].remove(e)
            with masked(model, _dropped(model, kept)):
                oracle = model(x)
            torch.testing.assert_close(drop_experts(model, kept)(x), oracle, atol=2e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("opts", [
    PruneOptions("expert_only", 0.5),
    PruneOptions("expert_only", 0.5, similarity="coselect"),
    PruneOptions("expert_only", 0.5, similarity="router"),
    PruneOptions("random", 0.5, seed=4),
], ids=["coselect-output", "coselect", "router", "random"])
def test_each_methods_pruned_model_and_its_directory_equal_the_oracle(opts, model_and_data, moe_dir, tmp_path):
    model, calib, x = model_and_data
    pruned, report = prune(model, calib, opts)
    dropped = _dropped(model, report.kept)
    assert sum(map(len, dropped)) == 8
    with masked(model, dropped):
        oracle = model(x)
    torch.testing.assert_close(pruned(x), oracle, atol=2e-5, rtol=1e-5)
    out = write_pruned_dir(pruned, moe_dir, tmp_path / "pruned", report.to_dict())
    reloaded, cfg = load_hf_model_dir(out, dtype=torch.float32)
    assert [cfg.experts_in_layer(i) for i in range(cfg.num_layers)] == report.experts_after
    torch.testing.assert_close(reloaded(x), oracle, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_a_never_selected_expert_costs_nothing_and_goes_first(model_and_data):
    model, calib, x = model_and_data
    model = drop_experts(model, [list(range(layer.mlp.num_experts)) for layer in model.layers])   # a copy
    router = model.layers[0].mlp.router.weight
    r = router.norm(dim=1).mean() * torch.randn(2, router.shape[1], generator=torch.Generator().manual_seed(0))
    # Rows r1, -r1, r2, -r2: every token has at least two logits > 0, so expert 5 (logit 0) never makes top-2.
    router[:4] = torch.stack([r[0], -r[0], r[1], -r[1]])
    router[5] = 0.0
    kept = [[e for e in range(8) if e != 5], list(range(8))]
    torch.testing.assert_close(drop_experts(model, kept)(x), model(x), atol=1e-6, rtol=1e-6)
    # Output-weighted co-selection puts the silent experts at distance 0 from all: keeping all but one expert
    # drops one of them (5, or another the new rows starved), and the model's output does not move.
    silent = collect_stats(model, calib, activations=False)[0].coselect.diagonal() == 0
    assert silent[5]
    pruned, report = prune(model, calib, PruneOptions("expert_only", 1 / 16))
    (dropped,) = _dropped(model, report.kept)[0]
    assert silent[dropped] and report.kept[1] == list(range(8))
    torch.testing.assert_close(pruned(calib[:4]), model(calib[:4]), atol=1e-6, rtol=1e-6)


def test_output_weighted_distance_spares_the_layer_that_writes_more():
    g = torch.Generator().manual_seed(2)
    chosen = torch.zeros(200, 6, dtype=torch.float64)
    chosen.scatter_(1, torch.rand(200, 6, generator=g).topk(2, dim=1).indices, 1.0)
    coselect = chosen.T @ chosen
    contribution = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    quiet = output_weighted_distance(coselect, contribution, 200)
    loud = output_weighted_distance(coselect, 100 * contribution, 200)
    torch.testing.assert_close(loud, 100 * quiet)
    torch.testing.assert_close(quiet, coselection_distance(coselect) * torch.minimum(
        contribution[:, None], contribution[None, :]) / 200)
    # One global threshold: the three merges come from the quiet layer, whichever order the layers are in.
    for layers, quiet_at in (([quiet, loud], 0), ([loud, quiet], 1)):
        clusters = global_clusters(layers, 9, [2, 2]).clusters
        assert len(clusters[quiet_at]) == 3 and len(clusters[1 - quiet_at]) == 6


def test_cheapest_keeper_keeps_the_member_that_leaves_least_behind():
    cosine = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    # Expert 2 is never co-selected with the others and silent; 1 is the loudest.
    contribution = torch.tensor([4.0, 9.0, 0.0], dtype=torch.float64)
    assert cheapest_keeper([0, 1, 2], cosine, contribution) == 1        # loses 0.5 x 4 + 0, against 4.5 or 13
    assert cheapest_keeper([0, 2], cosine, contribution) == 0
    assert cheapest_keeper([0, 1], cosine, torch.tensor([5.0, 5.0, 0.0], dtype=torch.float64)) == 0
