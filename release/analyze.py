"""`glassbox release analyze`: Analysis360-style measurements of every checkpoint, added to the release.

Per checkpoint: validation perplexity (on the release's stored validation samples), memorization score (the
fraction of a 32-token greedy continuation that equals the training data, given 32-token prompts drawn from the
released chunks; the same prompts for every checkpoint), and the L2 norm of each layer's weights. Results go to
`model/analysis/analysis.zarr` (arrays indexed by checkpoint) with plots beside it; the model card gains an
Analyses section and the manifest is rewritten. A release whose files no longer match its manifest is refused,
so analyzing never blesses a tampered file with a fresh hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glassbox.atomic import staged_dir, write_json
from glassbox.errors import GlassboxError
from glassbox.release.layout import ReleaseLayout
from glassbox.release.manifest import check_manifest, write_manifest
from glassbox.release.plots import line_plot

ANALYSIS_DIR = "analysis"
PLOTS = ["perplexity.png", "memorization.png", "weight_norms.png"]


@dataclass
class AnalyzeOptions:
    num_prompts: int = 32
    prompt_len: int = 32
    continuation_len: int = 32
    seed: int = 0


def _measure(layout: ReleaseLayout, index: dict, opts: AnalyzeOptions) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from glassbox.checkpoints.hf_format import load_hf_model_dir
    from glassbox.models.loss import mean_next_token_loss
    from glassbox.release.evaluate import draw_memorization_sequences, layer_weight_norms, memorization_scores
    from glassbox.release.probe import load_transformers_model

    val = torch.from_numpy(np.load(layout.dataset / "validation.npy").astype(np.int64))
    chunk_paths = sorted((layout.dataset / "chunks").glob("*.npy"))
    if not chunk_paths:
        raise GlassboxError(f"no training chunks in {layout.dataset / 'chunks'}")
    sequences = draw_memorization_sequences([np.load(p) for p in chunk_paths], opts.num_prompts,
                                            opts.prompt_len + opts.continuation_len, opts.seed)
    steps, ppl, mem, mem_each, norms, names = [], [], [], [], [], None
    for b in tqdm(index["branches"], desc="analyze", unit="ckpt"):
        model, _ = load_hf_model_dir(layout.branch(b["branch"]))
        steps.append(b["step"])
        ppl.append(math.exp(mean_next_token_loss(model, val)))
        scores = memorization_scores(load_transformers_model(layout.branch(b["branch"])), sequences, opts.prompt_len)
        mem_each.append(scores.numpy())
        mem.append(float(scores.mean()))
        names, layer_norms = layer_weight_norms(model)
        norms.append(layer_norms)
    return {"steps": np.array(steps, dtype=np.int64), "perplexity": np.array(ppl), "memorization": np.array(mem),
            "memorization_per_prompt": np.stack(mem_each), "weight_norms": np.array(norms), "norm_names": names,
            "prompts": sequences.numpy()}


def _write(out: Path, m: dict[str, Any], opts: AnalyzeOptions, index: dict) -> None:
    import zarr

    g = zarr.open_group(out / "analysis.zarr", mode="w")
    g.attrs.update({"branches": [b["branch"] for b in index["branches"]], "prompt_len": opts.prompt_len,
                    "continuation_len": opts.continuation_len, "num_prompts": opts.num_prompts, "seed": opts.seed,
                    "val_samples": index["val_samples"]})
    for key in ("steps", "perplexity", "memorization", "memorization_per_prompt", "weight_norms", "prompts"):
        g.create_array(key, data=m[key])
    g["weight_norms"].attrs["columns"] = m["norm_names"]
    steps = m["steps"].tolist()
    line_plot(out / PLOTS[0], "validation perplexity", "step", "perplexity",
              [("validation", steps, m["perplexity"].tolist())], logy=True)
    line_plot(out / PLOTS[1], f"memorization ({opts.prompt_len}-token prompts)", "step", "memorization score",
              [("greedy match", steps, m["memorization"].tolist())])
    line_plot(out / PLOTS[2], "weight L2 norm per layer", "step", "norm",
              [(name, steps, m["weight_norms"][:, i].tolist()) for i, name in enumerate(m["norm_names"])])


def analyze_release(release_dir: Path, opts: AnalyzeOptions | None = None) -> dict[str, Any]:
    """Measure every checkpoint and add the results to the release; returns the card's analysis summary."""
    from glassbox.release.build import write_cards

    opts = opts or AnalyzeOptions()
    if min(opts.num_prompts, opts.prompt_len, opts.continuation_len) <= 0:
        raise GlassboxError("--num-prompts, --prompt-len and --continuation-len must be positive")
    layout = ReleaseLayout(release_dir)
    index = layout.read_index()
    check = check_manifest(layout.root, layout.read_json(layout.manifest), layout.manifest.name)
    # An earlier analysis is replaced, so its files may differ; everything else must match the manifest.
    problems = [p for p in check.problems() if not p.split(": ", 1)[1].startswith(f"model/{ANALYSIS_DIR}/")]
    if problems:
        raise GlassboxError(f"{layout.root} does not match its manifest ({problems[0]}); run `glassbox release verify`")
    m = _measure(layout, index, opts)
    with staged_dir(layout.model / ANALYSIS_DIR, replace=True) as tmp:
        _write(tmp, m, opts, index)
    summary = {
        "val_samples": index["val_samples"], "prompt_len": opts.prompt_len,
        "continuation_len": opts.continuation_len, "num_prompts": opts.num_prompts, "plots": PLOTS,
        "rows": [{"branch": b["branch"], "step": b["step"], "perplexity": float(p), "memorization": float(s)}
                 for b, p, s in zip(index["branches"], m["perplexity"], m["memorization"])],
    }
    index["card"]["analysis"] = summary
    write_json(layout.index, index)
    write_cards(layout.root, index)
    write_manifest(layout.root, layout.manifest.name)
    return summary
