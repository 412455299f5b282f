"""`glassbox release build`: turn a finished run directory into a Hub-ready release directory.

The release is built aside and renamed into place only when complete (nothing half-written), and nothing in it
comes from the clock or the building machine (times and paths are the run's own), so building the same run twice
gives the same bytes (the manifest proves it).
See `glassbox.release.layout` for the directory layout and the branch naming scheme.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glassbox.atomic import staged_dir, write_json, write_text
from glassbox.data.order_log import DataOrderLog
from glassbox.data.store import token_dtype
from glassbox.errors import GlassboxError
from glassbox.release import layout as L
from glassbox.release.manifest import write_manifest
from glassbox.release.model_card import BranchRow, CardFacts, dataset_card, model_card
from glassbox.release.plots import line_plot
from glassbox.release.push import check_repo_id
from glassbox.release.run_reader import RunInfo, read_run

RELEASE_FORMAT = 1


@dataclass
class BuildOptions:
    repo_id: str = ""                   # default: glassbox/<run directory name>
    dataset_repo_id: str = ""           # default: <repo_id>-data
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["en"])
    val_samples: int = 16               # validation samples for each checkpoint's loss (stored in the dataset repo)
    probe_len: int = 16                 # tokens in the logit probe
    force: bool = False                 # replace an existing release directory


def released_store_names(n: int) -> list[str]:
    """Where each token store goes inside the dataset repo: `store` for one, `store/source_I` for a blend."""
    return ["store"] if n == 1 else [f"store/source_{i}" for i in range(n)]


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _copy_tree(src: Path, dst: Path) -> None:
    # Lock files and staging folders are the writer's scratch (the sampler's index cache leaves `.lock` files).
    shutil.copytree(src, dst, copy_function=shutil.copyfile, symlinks=False,
                    ignore=shutil.ignore_patterns("*.lock", "*.tmp", "*.tmp.*"))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Same bytes under another path; a hard link avoids storing a large model twice on disk."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_fingerprint(info: RunInfo, sampler) -> str:
    """The data the sampler reads now must be the data the run trained on."""
    recorded = info.manifest.get("data", {}).get("fingerprint")
    if recorded and recorded != sampler.fingerprint:
        raise GlassboxError(
            f"data fingerprint mismatch: {info.run_dir / 'manifest.json'} records {recorded}, but the data at "
            f"{', '.join(map(str, info.config.data.dirs()))} has {sampler.fingerprint}"
        )
    return sampler.fingerprint


def _write_chunks(info: RunInfo, sampler, steps: list[int], out: Path, vocab_size: int) -> list[list[Any]]:
    """The training samples of each checkpoint interval, in order, each step checked against the data-order log."""
    from tqdm import tqdm

    from glassbox.data.order_log import check_logged_batch

    rows, prev = [], 0
    dtype = token_dtype(vocab_size)
    source = ", ".join(map(str, info.config.data.dirs()))
    for step in tqdm(steps, desc="chunks", unit="chunk"):
        logged = [info.order_log.row(s) for s in range(prev + 1, step + 1)]
        start = logged[0]["cursor_start"]
        count = logged[-1]["cursor_start"] + logged[-1]["batch_size"] - start
        samples = sampler.samples(start, count)
        for row in logged:
            lo = row["cursor_start"] - start
            check_logged_batch(samples[lo:lo + row["batch_size"]], row, source)
        name = f"chunks/{L.branch_name(step)}.npy"
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.save(f, samples.numpy().astype(dtype))
        rows.append([f"`{name}`", f"{prev + 1}-{step}", count, start])
        prev = step
    return rows


def _hyperparameters(cfg) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("optimizer", "schedule", "batch"):
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            if isinstance(v, list) and (not v or isinstance(v[0], dict)):
                v = json.dumps(v, sort_keys=True)
            out[f"{section}.{k}"] = v
    out["data.seq_len"] = cfg.data.seq_len
    out["data.seed"] = cfg.data.seed
    out["seed"] = cfg.seed
    for k, v in dataclasses.asdict(cfg.parallel).items():
        out[f"parallel.{k}"] = v
    return out


def _compute(info: RunInfo) -> dict[str, Any]:
    """Hardware and time as the run recorded them (manifest and metrics), not as this machine sees them."""
    out: dict[str, Any] = {}
    for key in ("hardware", "world_size_history"):
        if key in info.manifest:
            value = info.manifest[key]
            out[key.replace("_", " ")] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
    world = sorted({int(r["world_size"]) for r in info.metrics if "world_size" in r})
    if world:
        out["world sizes"] = world
    times = [float(r["step_time"]) for r in info.metrics if "step_time" in r]
    if times:
        out["training time (s, sum of step times)"] = round(sum(times), 3)
    return out


def _reproduce_commands(repo_id: str, dataset_repo: str, name: str, steps: list[int]) -> list[str]:
    mid = steps[len(steps) // 2]
    return [
        f"hf download {repo_id} --local-dir {name}/model",
        f"hf download {dataset_repo} --repo-type dataset --local-dir {name}/dataset",
        "# retrain from scratch on the released token store:",
        f"glassbox train --config {name}/model/reproduce/config.yaml --data {name}/dataset/store --run-dir runs/{name}",
        "# or, from a local release directory (`glassbox release build`), replay one step bit for bit:",
        f"glassbox reproduce --release RELEASE_DIR --step {mid}",
    ]


def _export_branches(info: RunInfo, tmp: Path, val: Any, probe_ids: list[int]) -> list[dict[str, Any]]:
    """Export every checkpoint as a branch (HF export + raw training state) and measure it."""
    from tqdm import tqdm

    from glassbox.checkpoints.export import export_checkpoint
    from glassbox.checkpoints.hf_format import load_hf_model_dir
    from glassbox.checkpoints.consolidate import consolidate
    from glassbox.checkpoints.loading import checkpoint_view
    from glassbox.models.loss import mean_next_token_loss
    from glassbox.release.probe import load_transformers_model, probe_summary

    branches = []
    seq_len = info.config.data.seq_len
    for step, ckpt in tqdm(info.checkpoints.items(), desc="export", unit="ckpt"):
        view = checkpoint_view(ckpt)
        if view.step != step:
            raise GlassboxError(f"{ckpt} holds step {view.step}, not {step}")
        name = L.branch_name(step)
        out = tmp / L.BRANCHES_DIR / name
        export_checkpoint(ckpt, out)
        consolidate(view, out / L.TRAINING_STATE)      # self-contained, even if its tensors were spread
        model, _ = load_hf_model_dir(out)
        loss = mean_next_token_loss(model, val)
        row = info.order_log.row(step)
        tokens = (int(row["cursor_start"]) + int(row["batch_size"])) * seq_len
        probe = probe_summary(load_transformers_model(out), probe_ids)
        branches.append({"branch": name, "step": step, "tokens": tokens, "val_loss": loss, "probe": probe})
    return branches


def _main_branch(tmp: Path, final: str, info: RunInfo) -> None:
    src = tmp / L.BRANCHES_DIR / final
    main = tmp / L.MODEL_DIR
    for path in sorted(src.iterdir()):
        if path.is_file():
            _link_or_copy(path, main / path.name)
    _copy_file(info.run_dir / "metrics.jsonl", main / "metrics" / "metrics.jsonl")
    write_text(main / "reproduce" / "config.yaml", info.config_text)
    write_json(main / "reproduce" / "run_manifest.json", info.manifest)
    xs, ys = info.train_loss_curve()
    if not xs:
        raise GlassboxError(f"{info.run_dir / 'metrics.jsonl'} has no loss rows to plot")
    line_plot(main / "loss_curve.png", "training loss", "step", "loss", [("train", xs, ys)])


def _dataset(info: RunInfo, tmp: Path, sampler, val, store_meta: dict, tokenizer: Path, vocab: int) -> list:
    ds = tmp / L.DATASET_DIR
    dirs = info.config.data.dirs()
    for src, name in zip(dirs, released_store_names(len(dirs))):
        _copy_tree(src, ds / name)
    _copy_tree(info.run_dir / "data_order.zarr", ds / "data_order.zarr")
    DataOrderLog(ds).fold()     # a run that did not end cleanly leaves rows in the journal: publish plain zarr
    write_json(ds / "meta.json", store_meta)
    _copy_file(tokenizer, ds / "tokenizer.json")
    with open(ds / "validation.npy", "wb") as f:
        np.save(f, val.numpy().astype(token_dtype(vocab)))
    return _write_chunks(info, sampler, list(info.checkpoints), ds, vocab)


def _describe_source(src: Any) -> str:
    """One line per corpus from meta.json's `sources` entries (spec, documents, tokens, content hash)."""
    if not isinstance(src, dict):
        return str(src)
    details = [f"{src[k]} {k}" for k in ("documents", "tokens") if k in src]
    if "sha256" in src:
        details.append(f"sha256 {str(src['sha256'])[:16]}")
    name = src.get("spec") or src.get("path") or src.get("kind") or "source"
    return f"{name} ({', '.join(details)})" if details else str(name)


def card_facts(info: RunInfo, opts: BuildOptions, index: dict[str, Any], metas: list[dict]) -> CardFacts:
    from glassbox.checkpoints.hf_format import hf_config_from

    cfg = info.config
    tokens = index["branches"][-1]["tokens"]
    sources = [s for meta in metas for s in meta.get("sources", [])] or [str(p) for p in cfg.data.dirs()]
    store_meta = metas[0]
    return CardFacts(
        name=index["name"],
        repo_id=index["repo_id"],
        dataset_repo_id=index["dataset_repo_id"],
        license=opts.license,
        language=list(opts.language),
        architecture=hf_config_from(cfg.model).architectures[0],
        model=dataclasses.asdict(cfg.model),
        num_params=cfg.model.num_params(),
        hyperparameters=_hyperparameters(cfg),
        data_sources=[_describe_source(s) for s in sources],
        data_fingerprint=index["data_fingerprint"],
        tokenizer_vocab=int(store_meta.get("vocab_size", cfg.model.vocab_size)),
        seq_len=cfg.data.seq_len,
        tokens=tokens,
        steps=max(info.checkpoints),
        train_flops=float(cfg.model.flops_per_token(cfg.data.seq_len)) * tokens,
        compute=_compute(info),
        branches=[BranchRow(b["branch"], b["step"], b["tokens"], b["val_loss"]) for b in index["branches"]],
        main_branch=index["main_branch"],
        val_samples=index["val_samples"],
        reproduce_commands=_reproduce_commands(index["repo_id"], index["dataset_repo_id"], index["name"],
                                               [b["step"] for b in index["branches"]]),
        data_meta={k: v for k, v in store_meta.items() if isinstance(v, (str, int, float)) and k != "fingerprint"},
    )


def write_cards(root: Path, index: dict[str, Any]) -> None:
    """(Re)write both READMEs from the facts stored in release.json."""
    facts = CardFacts(**{**index["card"], "branches": [BranchRow(**b) for b in index["card"]["branches"]]})
    write_text(root / L.MODEL_DIR / "README.md", model_card(facts))
    write_text(root / L.DATASET_DIR / "README.md", dataset_card(facts, index["chunks"]))


def build_release(run_dir: Path, out: Path, opts: BuildOptions | None = None) -> dict[str, Any]:
    """Build the release of `run_dir` at `out`; returns release.json's content."""
    from glassbox.data.sampler import build_sampler

    opts = opts or BuildOptions()
    run_dir, out = Path(run_dir), Path(out)
    name = run_dir.resolve().name
    repo_id = opts.repo_id or f"glassbox/{name}"
    check_repo_id(repo_id, "--repo-id", "" if opts.repo_id else "the run directory's name")
    dataset_repo_id = opts.dataset_repo_id or f"{repo_id}-data"
    check_repo_id(dataset_repo_id, "--dataset-repo-id", "" if opts.dataset_repo_id else "--repo-id")
    if out.exists() and not opts.force:
        raise GlassboxError(f"{out} already exists; pass --force to replace it")
    if opts.val_samples <= 0 or opts.probe_len <= 0:
        raise GlassboxError("--val-samples and --probe-len must be positive")
    info = read_run(run_dir)
    cfg = info.config
    sampler = build_sampler(cfg.data, "train")
    stores = sampler.stores
    fingerprint = _check_fingerprint(info, sampler)
    val = build_sampler(cfg.data, "valid").samples(0, opts.val_samples)
    if opts.probe_len > val.shape[1]:
        raise GlassboxError(f"--probe-len {opts.probe_len} exceeds the sample length {val.shape[1]}")
    probe_ids = [int(t) for t in val[0, :opts.probe_len]]
    with staged_dir(out, replace=opts.force) as tmp:
        branches = _export_branches(info, tmp, val, probe_ids)
        final = branches[-1]["branch"]
        _main_branch(tmp, final, info)
        chunks = _dataset(info, tmp, sampler, val, stores[0].meta, stores[0].tokenizer_path, stores[0].vocab_size)
        index: dict[str, Any] = {
            "format": RELEASE_FORMAT,
            "name": name,
            "repo_id": repo_id,
            "dataset_repo_id": dataset_repo_id,
            "data_fingerprint": fingerprint,
            "main_branch": final,
            "branches": branches,
            "chunks": chunks,
            "probe_ids": probe_ids,
            "val_samples": opts.val_samples,
            "seq_len": cfg.data.seq_len,
            "stores": released_store_names(len(stores)),
        }
        index["card"] = dataclasses.asdict(card_facts(info, opts, index, [s.meta for s in stores]))
        write_json(tmp / L.RELEASE_INDEX, index)
        write_cards(tmp, index)
        write_manifest(tmp, L.MANIFEST)
    return index

