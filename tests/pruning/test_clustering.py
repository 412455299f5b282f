"""Stage 1's pieces on known inputs: complete linkage, the global threshold search, the representative, Wanda."""

from __future__ import annotations

import itertools

import pytest
import torch

from glassbox.errors import GlassboxError
from glassbox.pruning.expert_clustering import cluster_layer, global_clusters, representative
from glassbox.pruning.expert_similarity import coselection_distance, router_distance
from glassbox.pruning.wanda import row_mask


def _random_dist(n: int, seed: int, levels: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, n, generator=g, dtype=torch.float64)
    if levels:                                   # few distinct values: many ties
        d = (d * levels).floor() / levels
    d = (d + d.T) / 2
    d.fill_diagonal_(0.0)
    return d


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.2, 0.45, 0.7])
def test_clusters_respect_complete_linkage(seed, threshold):
    d = _random_dist(12, seed)
    clusters = cluster_layer(d, threshold)
    assert sorted(i for c in clusters for i in c) == list(range(12))
    for c in clusters:                           # every pair inside a cluster is within the threshold
        assert all(d[i, j] <= threshold for i, j in itertools.combinations(c, 2))
    for a, b in itertools.combinations(clusters, 2):   # and no two clusters could still merge
        assert max(d[i, j] for i in a for j in b) > threshold


def test_cluster_floor_is_kept():
    d = _random_dist(8, 0)
    assert len(cluster_layer(d, 10.0, min_clusters=3)) == 3


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("target", [6, 11, 17, 23])
def test_global_threshold_search_hits_the_target_and_converges(levels, target):
    dists = [_random_dist(8, s, levels) for s in range(3)]
    result = global_clusters(dists, target, [2, 2, 2])
    assert sum(len(c) for c in result.clusters) == target
    assert result.search_iterations < 64
    assert all(len(c) >= 2 for c in result.clusters)
    if levels is None:
        # Distinct distances: the search alone lands on the target (no tie-breaking merges needed).
        assert result.tie_merges == 0
        counts = sum(len(cluster_layer(d, result.threshold, 2)) for d in dists)
        assert counts == target
        assert sum(len(cluster_layer(d, result.threshold - 1e-6, 2)) for d in dists) > target


def test_global_target_outside_range_is_refused():
    dists = [_random_dist(4, 0), _random_dist(4, 1)]
    with pytest.raises(GlassboxError, match="between the layers' top-k total"):
        global_clusters(dists, 3, [2, 2])


def test_representative_is_nearest_the_centroid():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    d = torch.cdist(x, x)
    cluster = [0, 2, 3, 5, 6]
    centroid = x[cluster].mean(0)
    nearest = min(cluster, key=lambda i: float((x[i] - centroid).norm()))
    assert representative(cluster, d) == nearest


def test_distances_are_on_one_scale():
    coselect = torch.tensor([[10.0, 10.0, 0.0], [10.0, 10.0, 0.0], [0.0, 0.0, 5.0]])
    d = coselection_distance(coselect)
    assert d[0, 1] == 0.0 and d[0, 2] == 1.0 and torch.all(d.diagonal() == 0)
    r = router_distance(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.isclose(r.sum() / 30, torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6])
def test_wanda_mask_has_the_requested_sparsity_per_row_and_drops_the_lowest_scores(sparsity):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g)
    norm = torch.rand(40, generator=g) * 3
    mask = row_mask(w, norm, sparsity)
    dropped = round(sparsity * 40)
    assert ((~mask).sum(dim=1) == dropped).all()
    score = w.abs() * norm
    for row in range(16):
        if 0 < dropped < 40:
            assert score[row][~mask[row]].max() <= score[row][mask[row]].min()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, float("nan")])
def test_wanda_refuses_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(GlassboxError, match="must be in"):
        row_mask(torch.ones(2, 4), torch.ones(4), sparsity)
