"""Greedy complete-linkage clustering of each layer's experts under one global threshold, binary-searched to hit
a total expert count; one representative kept per cluster.

At a threshold t, a layer starts with one cluster per expert and repeatedly merges the two clusters whose
complete linkage (their largest cross-pair distance) is smallest, while that linkage is <= t: every pair of experts
in a cluster is then within t of each other. A layer never drops below `min_clusters` (its top-k: routing needs
that many experts). Fewer clusters as t grows, so the total count over layers is monotone in t and a binary search
over t finds the smallest threshold whose total is <= the target. Distances tied at that threshold can make the
count jump past the target; the last merges are then taken one at a time, smallest linkage first over all layers
(ties: lower layer, then lower expert ids), so the total is exactly the target.

Representative: the member with the smallest sum of squared distances to the rest of its cluster. For Euclidean
features (router rows) that is exactly the member nearest the cluster's centroid, since sum_j |x_i - x_j|^2 =
n |x_i - c|^2 + const; for co-selection distances it is the same criterion on the distance itself. Ties go to
the expert that contributed more to the layer's output on the calibration tokens (routing weight x output norm;
a two-expert cluster is always such a tie), then the lower id. With the output-weighted co-selection distance,
whose values are costs rather than positions, the member kept is instead the cheapest keeper: the one that leaves
the least output behind when the others' tokens are rerouted to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glassbox.errors import GlassboxError


class _Agglomeration:
    """One layer's clustering state: clusters and their complete-linkage matrix."""

    def __init__(self, dist: torch.Tensor, min_clusters: int):
        self.clusters: list[list[int]] = [[i] for i in range(dist.shape[0])]
        self.linkage = dist.double().clone()
        self.linkage.fill_diagonal_(float("inf"))
        self.min_clusters = min_clusters

    def next_merge(self) -> tuple[float, int, int] | None:
        """(linkage, a, b) of the closest pair of clusters (a < b), or None at the floor."""
        if len(self.clusters) <= self.min_clusters:
            return None
        flat = int(torch.argmin(self.linkage))
        a, b = divmod(flat, self.linkage.shape[0])
        a, b = min(a, b), max(a, b)
        return float(self.linkage[a, b]), a, b

    def merge(self, a: int, b: int) -> None:
        merged = torch.maximum(self.linkage[a], self.linkage[b])
        self.linkage[a], self.linkage[:, a] = merged, merged
        self.linkage[a, a] = float("inf")
        keep = [i for i in range(self.linkage.shape[0]) if i != b]
        self.linkage = self.linkage[keep][:, keep]
        self.clusters[a] = sorted(self.clusters[a] + self.clusters[b])
        del self.clusters[b]

    def run_to(self, threshold: float) -> _Agglomeration:
        while (step := self.next_merge()) is not None and step[0] <= threshold:
            self.merge(step[1], step[2])
        return self


def cluster_layer(dist: torch.Tensor, threshold: float, min_clusters: int = 1) -> list[list[int]]:
    """One layer's clusters (sorted expert ids, clusters ordered by their first id) at `threshold`."""
    clusters = _Agglomeration(dist, min_clusters).run_to(threshold).clusters
    return sorted(clusters)


@dataclass
class ClusterResult:
    clusters: list[list[list[int]]]     # per layer, per cluster, expert ids
    threshold: float
    search_iterations: int
    tie_merges: int                     # merges taken one by one after the search to hit the target exactly


def global_clusters(dists: list[torch.Tensor], target: int, min_clusters: list[int],
                    tolerance: float = 1e-9, max_iterations: int = 200) -> ClusterResult:
    """Cluster every layer under one threshold so that the layers keep `target` clusters in total."""
    total = sum(d.shape[0] for d in dists)
    floor = sum(min_clusters)
    if not floor <= target <= total:
        raise GlassboxError(f"target expert count {target} must be between the layers' top-k total ({floor}) "
                            f"and the expert count ({total})")

    def count(t: float) -> int:
        return sum(len(cluster_layer(d, t, m)) for d, m in zip(dists, min_clusters))

    lo = -1.0                                             # below every distance: nothing merges
    hi = max(float(d.max()) for d in dists) + 1.0        # above every distance: every layer at its floor
    iterations = 0
    while hi - lo > tolerance and iterations < max_iterations:
        mid = (lo + hi) / 2
        if count(mid) <= target:
            hi = mid
        else:
            lo = mid
        iterations += 1
    states = [_Agglomeration(d, m).run_to(hi) for d, m in zip(dists, min_clusters)]
    if sum(len(s.clusters) for s in states) < target:
        # The count jumps past the target at `hi` (tied distances): stop at `lo` and merge one at a time.
        states = [_Agglomeration(d, m).run_to(lo) for d, m in zip(dists, min_clusters)]
    tie_merges = 0
    while sum(len(s.clusters) for s in states) > target:
        candidates = [(step[0], layer, step[1], step[2]) for layer, s in enumerate(states)
                      if (step := s.next_merge()) is not None]
        _, layer, a, b = min(candidates)
        states[layer].merge(a, b)
        tie_merges += 1
    return ClusterResult(clusters=[sorted(s.clusters) for s in states], threshold=hi,
                         search_iterations=iterations, tie_merges=tie_merges)


def representative(cluster: list[int], dist: torch.Tensor, contribution: torch.Tensor | None = None) -> int:
    """The member nearest the cluster's centroid (smallest sum of squared distances to the others); among members
    equally near (within rounding), the larger contributor."""
    sub = dist[cluster][:, cluster].double()
    spread = sub.pow(2).sum(dim=1)
    spread = torch.round(spread / max(float(spread.max()), 1e-300), decimals=9)
    gain = (contribution[cluster].double() if contribution is not None
            else torch.zeros(len(cluster), dtype=torch.float64))
    best = min(range(len(cluster)), key=lambda i: (float(spread[i]), -float(gain[i]), cluster[i]))
    return cluster[best]


def cheapest_keeper(cluster: list[int], cosine: torch.Tensor, contribution: torch.Tensor) -> int:
    """The member to keep when the cluster's other experts are dropped and their tokens rerouted to it: the one
    that leaves the least output behind, argmin over r of sum_m (co-selection distance r-m) x contribution_m;
    ties go to the larger contributor, then the lower id."""
    sub = cosine[cluster][:, cluster].double()
    gain = contribution[cluster].double()
    lost = sub @ gain
    lost = torch.round(lost / max(float(lost.max()), 1e-300), decimals=9)
    best = min(range(len(cluster)), key=lambda i: (float(lost[i]), -float(gain[i]), cluster[i]))
    return cluster[best]
