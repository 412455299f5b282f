"""The pruning methods over one calibration set: STUN and its three baselines, each to a total sparsity.

Sparsity counts the expert weights only (the MLPs, almost all of an MoE's parameters): the fraction of the
original model's expert weights that are gone, whether as dropped experts or as zeros inside kept ones.
Attention, router, norms and embeddings are never pruned, so every method is compared on the same weights.

- stun: stage 1 keeps `experts_keep` of all experts (clustering, glassbox.pruning.expert_clustering), stage 2
  Wanda-prunes the survivors to whatever is left of the target: s2 = 1 - (1 - S) / (fraction of experts kept).
  `experts_keep="auto"` chooses the fraction per model (glassbox.pruning.auto_keep): a few candidates in
  [1 - S, 1], 1.0 (plain Wanda) among them, each pruned on 3/4 of the calibration windows and scored by its loss on
  each of the rest; a candidate displaces 1.0 only by a gain beyond 2 paired standard errors, the lowest loss among
  those and 1.0 wins, and the model is then pruned at that fraction on all the windows.
- unstructured: Wanda on every expert at S (no expert removed).
- expert_only: stage 1 alone, keeping 1 - S of the experts.
- random: 1 - S of each layer's experts, drawn uniformly with the seed.

Stage 1's distance (glassbox.pruning.expert_similarity): co-selection weighted by the experts' output
contributions (the default), the paper's plain co-selection, or router-weight distance. With the weighted
distance each cluster keeps the member that leaves the least output behind when the others' tokens are rerouted
to it (expert_clustering.cheapest_keeper); with the others, the member nearest the centroid.

Forward passes: co-selection needs one calibration pass (the router variant none); Wanda needs one more, over
the model it prunes (after stage 1 the routing has changed). `auto` adds one co-selection pass plus, per
candidate, one Wanda pass and one loss evaluation. None of these grows with the expert count.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from glassbox.errors import GlassboxError
from glassbox.models.transformer import Transformer
from glassbox.pruning.auto_keep import candidate_keeps, choose_keep, split_windows
from glassbox.pruning.expert_clustering import cheapest_keeper, global_clusters, representative
from glassbox.pruning.expert_drop import RouterMode, drop_experts
from glassbox.pruning.expert_similarity import coselection_distance, output_weighted_distance, router_distance
from glassbox.pruning.moe_stats import collect_stats
from glassbox.pruning.wanda import owl_ratios, wanda_prune_experts

Method = Literal["stun", "unstructured", "expert_only", "random"]
Similarity = Literal["coselect-output", "coselect", "router"]
SIMILARITIES: tuple[Similarity, ...] = ("coselect-output", "coselect", "router")
METHODS: tuple[Method, ...] = ("stun", "unstructured", "expert_only", "random")
ExpertsKeep = float | Literal["auto"]


@dataclass
class PruneOptions:
    method: Method
    sparsity: float
    experts_keep: ExpertsKeep | None = None                # stun: the fraction of experts stage 1 keeps, or "auto"
    similarity: Similarity = "coselect-output"
    router: RouterMode = "keep"
    owl: bool = False
    seed: int = 0
    batch_size: int = 8


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    sparsity: float                     # achieved, over the original expert weights
    experts_before: list[int]
    experts_after: list[int]
    experts_keep: float | None          # the fraction of experts stage 1 aimed at (stun: given or chosen by auto)
    kept: list[list[int]]               # per layer, the original ids of the experts kept
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_experts_keep(text: str) -> ExpertsKeep:
    """`--experts-keep`'s value: 'auto' or a number in (0, 1]."""
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise GlassboxError(f"--experts-keep {text!r}: must be a number in (0, 1] or 'auto'")
    return value


def check_options(model: Transformer, opts: PruneOptions) -> None:
    cfg = model.config
    if not cfg.is_moe:
        raise GlassboxError("pruning: the model is dense (no experts); STUN and its baselines prune MoE models")
    if opts.method not in METHODS:
        raise GlassboxError(f"pruning: unknown method {opts.method!r} (one of {', '.join(METHODS)})")
    if not 0.0 <= opts.sparsity < 1.0:
        raise GlassboxError(f"--sparsity {opts.sparsity}: must be in [0, 1)")
    if opts.method == "stun" and opts.experts_keep != "auto":
        if not isinstance(opts.experts_keep, (int, float)) or not 0.0 < opts.experts_keep <= 1.0:
            raise GlassboxError(f"--experts-keep {opts.experts_keep!r}: must be a number in (0, 1] or 'auto' for stun")
        if opts.experts_keep < 1.0 - opts.sparsity:
            raise GlassboxError(f"--experts-keep {opts.experts_keep} removes more experts than --sparsity "
                                f"{opts.sparsity} allows (keep at least {1.0 - opts.sparsity:g})")
    if opts.similarity not in SIMILARITIES:
        raise GlassboxError(f"--similarity {opts.similarity!r}: one of {', '.join(SIMILARITIES)}")
    if opts.router not in ("keep", "mean"):
        raise GlassboxError(f"--router {opts.router!r}: keep or mean")
    keep = _structured_keep_fraction(opts)
    if keep not in (None, "auto"):
        total = sum(cfg.experts_in_layer(i) for i in range(cfg.num_layers))
        floor = sum(cfg.top_k_in_layer(i) for i in range(cfg.num_layers))
        target = round(keep * total)
        if target < floor:
            raise GlassboxError(f"pruning: keeping {target} of {total} experts is below top-k in every layer "
                                f"(at least {floor}: each layer routes each token to its top-k experts)")


def _structured_keep_fraction(opts: PruneOptions) -> ExpertsKeep | None:
    return {"stun": opts.experts_keep, "expert_only": 1.0 - opts.sparsity, "random": 1.0 - opts.sparsity}.get(
        opts.method)


def _expert_weights(model: Transformer) -> int:
    return sum(layer.mlp.gate_proj.numel() * 3 for layer in model.layers)


def _nonzero_expert_weights(model: Transformer) -> int:
    return sum(int((p != 0).sum()) for layer in model.layers
               for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))


@dataclass
class ExpertDistances:
    """Stage 1's input, from at most one calibration pass: per layer the distances the clustering cuts, and what
    picks each cluster's keeper (plain co-selection distances and contributions; None for router distance)."""
    dists: list[torch.Tensor]
    cosine: list[torch.Tensor] | None
    contribution: list[torch.Tensor] | None
    forward_passes: int
    seconds: float


def expert_distances(model: Transformer, windows: torch.Tensor, opts: PruneOptions) -> ExpertDistances:
    started = time.perf_counter()
    if opts.similarity == "router":
        dists = [router_distance(layer.mlp.router.weight.detach()).cpu() for layer in model.layers]
        return ExpertDistances(dists, None, None, 0, time.perf_counter() - started)
    stats = collect_stats(model, windows, opts.batch_size, activations=False)
    contribution = [s.contribution.cpu() for s in stats]
    cosine = [coselection_distance(s.coselect).cpu() for s in stats]
    dists = cosine if opts.similarity == "coselect" else [
        output_weighted_distance(s.coselect, s.contribution, s.tokens).cpu() for s in stats]
    return ExpertDistances(dists, cosine, contribution, 1, time.perf_counter() - started)


def clusters_at(model: Transformer, distances: ExpertDistances, keep: float, opts: PruneOptions
                ) -> tuple[list[list[int]], list[list[list[int]]], dict]:
    """Stage 1 from `distances`: per layer the kept expert ids and, aligned, the cluster each stands for; plus
    its cost (the distances' pass included)."""
    cfg = model.config
    started = time.perf_counter()
    target = round(keep * sum(d.shape[0] for d in distances.dists))
    result = global_clusters(distances.dists, target, [cfg.top_k_in_layer(i) for i in range(cfg.num_layers)])
    kept = []
    for i, clusters in enumerate(result.clusters):
        if opts.similarity == "coselect-output":
            kept.append([cheapest_keeper(c, distances.cosine[i], distances.contribution[i]) for c in clusters])
        else:
            gain = distances.contribution[i] if distances.contribution else None
            kept.append([representative(c, distances.dists[i], gain) for c in clusters])
    cost = {"seconds": distances.seconds + time.perf_counter() - started,
            "forward_passes": distances.forward_passes, "similarity": opts.similarity,
            "threshold": result.threshold, "search_iterations": result.search_iterations,
            "tie_merges": result.tie_merges, "clusters": result.clusters, "router": opts.router}
    return kept, result.clusters, cost


def cluster_experts(model: Transformer, windows: torch.Tensor, keep: float, opts: PruneOptions
                    ) -> tuple[list[list[int]], list[list[list[int]]], dict]:
    """Stage 1: per layer the kept expert ids and, aligned, the cluster each stands for; plus its cost."""
    return clusters_at(model, expert_distances(model, windows, opts), keep, opts)


def random_experts(model: Transformer, keep: float, seed: int) -> list[list[int]]:
    """`round(keep x all experts)` experts in all, spread over the layers in proportion to their counts (the
    remainder to random layers), each layer's drawn uniformly; never fewer than a layer's top-k."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [layer.mlp.num_experts for layer in model.layers]
    floors = [model.config.top_k_in_layer(i) for i in range(len(sizes))]
    counts = [max(int(keep * E), f) for E, f in zip(sizes, floors)]
    target = max(round(keep * sum(sizes)), sum(floors))
    for i in torch.randperm(len(sizes), generator=gen).tolist():
        if sum(counts) >= target:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
    return [sorted(torch.randperm(E, generator=gen)[:n].tolist()) for E, n in zip(sizes, counts)]


def wanda_stage(model: Transformer, windows: torch.Tensor, sparsity: float, opts: PruneOptions) -> dict:
    """Stage 2 in place: one calibration pass over `model`, then Wanda (with OWL ratios if asked)."""
    started = time.perf_counter()
    stats = collect_stats(model, windows, opts.batch_size, activations=True)
    ratios = owl_ratios(model, stats, sparsity) if opts.owl else [sparsity] * len(model.layers)
    zeroed = wanda_prune_experts(model, stats, ratios)
    return {"seconds": time.perf_counter() - started, "forward_passes": 1, "sparsity_in_experts": sparsity,
            "layer_sparsity": ratios, "owl": opts.owl, "zeroed": zeroed}


def _stage2_sparsity(model: Transformer, pruned: Transformer, sparsity: float) -> float:
    """Wanda's sparsity inside what stage 1 left, so that the total over the original expert weights is `sparsity`."""
    remaining = _expert_weights(pruned) / _expert_weights(model)
    return max(0.0, 1.0 - (1.0 - sparsity) / remaining)


def auto_experts_keep(model: Transformer, windows: torch.Tensor, opts: PruneOptions) -> tuple[float, dict]:
    """`--experts-keep auto` (glassbox.pruning.auto_keep): the candidate fraction chosen by the held-out loss of
    its STUN model pruned on the fit windows (auto_keep.significant_best); and the search's record."""
    cfg = model.config
    fit, held_out = split_windows(windows)
    distances = expert_distances(model, fit, opts)
    keeps = candidate_keeps(opts.sparsity, sum(cfg.experts_in_layer(i) for i in range(cfg.num_layers)),
                            sum(cfg.top_k_in_layer(i) for i in range(cfg.num_layers)))

    def prune_at(keep: float) -> Transformer:
        kept, clusters, _ = clusters_at(model, distances, keep, opts)
        pruned = drop_experts(model, kept, clusters, opts.router)
        wanda_stage(pruned, fit, _stage2_sparsity(model, pruned, opts.sparsity), opts)
        return pruned

    keep, search = choose_keep(prune_at, held_out, keeps, opts.batch_size)
    search["forward_passes"] = distances.forward_passes + 2 * len(keeps)
    search["seconds"] += distances.seconds
    return keep, search


def prune(model: Transformer, windows: torch.Tensor, opts: PruneOptions) -> tuple[Transformer, PruneReport]:
    """Prune `model` (left untouched) by `opts.method`; the pruned copy and what was done."""
    check_options(model, opts)
    before = [layer.mlp.num_experts for layer in model.layers]
    original_weights = _expert_weights(model)
    stage1, stage2, search = {}, {}, None
    keep = _structured_keep_fraction(opts)
    if keep == "auto":
        keep, search = auto_experts_keep(model, windows, opts)
    if opts.method in ("stun", "expert_only"):
        kept, clusters, stage1 = cluster_experts(model, windows, keep, opts)
        pruned = drop_experts(model, kept, clusters, opts.router)
    elif opts.method == "random":
        kept = random_experts(model, keep, opts.seed)
        pruned = drop_experts(model, kept)
        stage1 = {"seconds": 0.0, "forward_passes": 0}
    else:
        kept = [list(range(n)) for n in before]
        pruned = drop_experts(model, kept)
    if search is not None:
        stage1["keep_search"] = search
    if opts.method in ("stun", "unstructured"):
        stage2 = wanda_stage(pruned, windows, _stage2_sparsity(model, pruned, opts.sparsity), opts)
    achieved = 1.0 - _nonzero_expert_weights(pruned) / original_weights
    report = PruneReport(method=opts.method, target_sparsity=opts.sparsity, sparsity=achieved,
                         experts_before=before, experts_after=[len(k) for k in kept], experts_keep=keep, kept=kept,
                         stage1=stage1, stage2=stage2)
    return pruned, report
