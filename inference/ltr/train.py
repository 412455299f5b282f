"""`glassbox ltr train`: fit the ranker's head with ListMLE on a collection, as a run with its own record.

The run directory keeps what a glassbox training run keeps, in the same places (ARCHITECTURE.md's run directory),
at the scale of a head trained on cached features:

    config.json        the resolved TrainConfig
    manifest.json      the collection's meta (model, tokenizer fingerprint, max_tokens), the split, the machine
    metrics.jsonl      a line per step (layers, epoch, step, loss) and per epoch (validation tau)
    data_order.jsonl   a line per step: the example ids of its ranked list, in list order
    checkpoints/layers_K/epoch_NNN/head.safetensors   every `checkpoint_every` epochs and the last
    ranker/            the chosen ranker, self-contained (what `glassbox serve --policy ltr --ranker` takes)

Reused from glassbox: the HF loader and Transformer (the trunk is the served model's own first layers), the
atomic writers. Not the torchrun trainer: its data pipeline is a token store for language modelling; this is a
few thousand parameters over a few hundred cached feature vectors, done in seconds on a CPU.

The trunk depth is chosen, not assumed: heads are trained on the features after each of `layers` (one trunk
pass gives them all), and the depth with the best validation tau becomes the ranker. The split (train,
validation, held-out test) is fixed by the seed, so `ltr eval` finds the same test prompts.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glassbox.atomic import write_json, write_text
from glassbox.errors import GlassboxError
from glassbox.inference.ltr.collect import Example, load_collection, machine_name
from glassbox.inference.ltr.listmle import BUCKET_WIDTH, buckets, kendall_tau, listmle_loss
from glassbox.inference.ltr.ranker import Head, Ranker, Trunk, length_calibration


@dataclass
class TrainConfig:
    collection: str
    model_dir: str
    run_dir: str
    layers: list[int] = field(default_factory=lambda: [2, 4, 8])
    head_hidden: int = 128
    list_size: int = 32
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.01
    test_fraction: float = 0.3
    val_fraction: float = 0.2
    max_prompt_tokens: int = 512
    bucket_width: int = BUCKET_WIDTH
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "cpu"
    # The depth served is the shallowest whose validation tau is within this of the best: scoring costs k of the
    # model's layers per prompt, on the same device as the engine, and a few hundredths of tau buy less latency
    # than the layers cost (on the 2-core CPU the 8-layer ranker's scoring took ~20% of the serving CPU time).
    tau_tolerance: float = 0.03

    def validate(self) -> None:
        if not self.layers or any(not isinstance(k, int) or k < 1 for k in self.layers):
            raise GlassboxError(f"ltr train: layers must be positive integers, got {self.layers!r}")
        for name in ("head_hidden", "list_size", "epochs", "max_prompt_tokens", "bucket_width", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise GlassboxError(f"ltr train: {name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.tau_tolerance < 2:
            raise GlassboxError(f"ltr train: tau_tolerance must be in [0, 2), got {self.tau_tolerance!r}")
        if self.list_size < 2:
            raise GlassboxError(f"ltr train: list_size must be >= 2 (a list of one has no order), got {self.list_size}")
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise GlassboxError(f"ltr train: {name} must be in (0, 1), got {getattr(self, name)!r}")


def split(examples: list[Example], seed: int, test_fraction: float, val_fraction: float
          ) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test), fixed by the seed and the example ids alone."""
    ids = sorted(e.id for e in examples)
    random.Random(seed).shuffle(ids)
    n_test = max(1, round(len(ids) * test_fraction))
    n_val = max(1, round((len(ids) - n_test) * val_fraction))
    test, val = set(ids[:n_test]), set(ids[n_test:n_test + n_val])
    if len(ids) - n_test - n_val < 2:
        raise GlassboxError(f"ltr: {len(ids)} examples leave fewer than 2 to train on")
    return ([e for e in examples if e.id not in test and e.id not in val], [e for e in examples if e.id in val],
            [e for e in examples if e.id in test])


def features_by_layer(trunk: Trunk, examples: list[Example], layers: list[int], max_tokens: int,
                      batch_size: int = 16) -> dict[int, torch.Tensor]:
    """{layer: [len(examples), 2H]} on the CPU, from one trunk pass per batch (batches of similar length)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    out = {k: torch.zeros(len(examples), 2 * trunk.config.hidden_size) for k in layers}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        feats = trunk.features([examples[i].prompt_ids for i in chunk], layers, max_tokens)
        for k in layers:
            out[k][chunk] = feats[k].cpu()
    return out


def lengths_of(examples: list[Example]) -> torch.Tensor:
    return torch.tensor([e.output_len for e in examples])


def standardised_head(train_feats: torch.Tensor, hidden: int) -> Head:
    head = Head(train_feats.shape[1], hidden)
    head.mean.copy_(train_feats.mean(0))
    head.std.copy_(train_feats.std(0).clamp_min(1e-6))
    return head


def tau_of(head: torch.nn.Module, feats: torch.Tensor, lengths: torch.Tensor) -> float:
    """Kendall's tau between the head's scores and shortness (minus the true length): 1 is a perfect ranking."""
    with torch.no_grad():
        return kendall_tau(head(feats).tolist(), (-lengths).tolist())


class RunLog:
    """The run's metrics and data-order lines, appended as they happen and flushed at each epoch's end."""

    def __init__(self, run_dir: Path):
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.order = open(run_dir / "data_order.jsonl", "a")

    def step(self, row: dict, ids: list[int]) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.order.write(json.dumps({k: row[k] for k in ("layers", "epoch", "step")} | {"ids": ids}) + "\n")

    def epoch(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.order.flush()

    def close(self) -> None:
        self.metrics.close()
        self.order.close()


def train_head(cfg: TrainConfig, layers: int, feats: torch.Tensor, train: list[Example], val_feats: torch.Tensor,
               val: list[Example], train_idx: list[int], log: RunLog, run_dir: Path) -> tuple[Head, float]:
    """Train one head on the features after `layers` layers; returns it and its final validation tau."""
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    x = feats[train_idx]
    labels = buckets(lengths_of(train), cfg.bucket_width)
    ids = [e.id for e in train]
    head = standardised_head(x, cfg.head_hidden)
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    step, tau = 0, float("nan")
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        perm = torch.randperm(len(train), generator=g).tolist()
        for start in range(0, len(perm) - 1, cfg.list_size):
            chunk = perm[start:start + cfg.list_size]
            if len(chunk) < 2:
                continue
            loss = listmle_loss(head(x[chunk]), labels[chunk]) / len(chunk)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            log.step({"layers": layers, "epoch": epoch, "step": step, "loss": loss.item()}, [ids[i] for i in chunk])
        head.eval()
        tau = tau_of(head, val_feats, lengths_of(val))
        log.epoch({"layers": layers, "epoch": epoch, "step": step, "val_kendall_tau": tau})
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            ckpt = run_dir / "checkpoints" / f"layers_{layers}" / f"epoch_{epoch:03d}"
            ckpt.mkdir(parents=True, exist_ok=True)
            tmp = ckpt / "head.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
            tmp.rename(ckpt / "head.safetensors")
    return head, tau


def train(cfg: TrainConfig) -> dict:
    """Run the training; returns a summary (validation tau per depth, the chosen depth, the ranker's path)."""
    from glassbox.inference.loader import load_model_dir

    cfg.validate()
    run_dir = Path(cfg.run_dir)
    if (run_dir / "ranker").exists():
        raise GlassboxError(f"ltr train: {run_dir} already holds a trained ranker; choose another --run-dir")
    meta, examples = load_collection(Path(cfg.collection))
    train_set, val, test = split(examples, cfg.seed, cfg.test_fraction, cfg.val_fraction)
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    model, tokenizer, _ = load_model_dir(Path(cfg.model_dir), dtype, cfg.device)
    if tokenizer is None or tokenizer.fingerprint() != meta["tokenizer_fingerprint"]:
        raise GlassboxError(f"ltr train: {cfg.model_dir}'s tokenizer is not the one {cfg.collection} was collected "
                            "with; train on the model that produced the lengths")
    depths = sorted(k for k in set(cfg.layers) if k <= model.config.num_layers)     # a shallow model: fewer tries
    if not depths:
        raise GlassboxError(f"ltr train: every depth in {cfg.layers} exceeds the model's {model.config.num_layers} "
                            "layers")
    trunk = Trunk.from_model(model, depths[-1])
    del model
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    write_json(run_dir / "manifest.json", {"collection": meta, "machine": machine_name(cfg.device),
                                           "split": {"train": len(train_set), "val": len(val), "test": len(test)},
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    start = time.perf_counter()
    everything = train_set + val
    feats = features_by_layer(trunk, everything, depths, cfg.max_prompt_tokens)
    feature_seconds = time.perf_counter() - start
    train_idx = list(range(len(train_set)))
    val_idx = list(range(len(train_set), len(everything)))
    log = RunLog(run_dir)
    results = {}
    try:
        for k in depths:
            head, tau = train_head(cfg, k, feats[k], train_set, feats[k][val_idx], val, train_idx, log, run_dir)
            results[k] = (head, tau)
    finally:
        log.close()
    top = max(results[k][1] for k in depths)
    near = [k for k in depths if results[k][1] >= top - cfg.tau_tolerance]       # empty only if tau is NaN
    best = min(near) if near else depths[0]
    with torch.no_grad():
        scores = results[best][0](feats[best]).tolist()
    calibration = length_calibration(scores, [e.output_len for e in everything])
    ranker = Ranker(Trunk.from_model(trunk, best), results[best][0],
                    {"layers": best, "head_hidden": cfg.head_hidden, "max_prompt_tokens": cfg.max_prompt_tokens,
                     "tokenizer_fingerprint": meta["tokenizer_fingerprint"], "base_model": meta["model_dir"],
                     "collection_max_tokens": meta["max_tokens"], "bucket_width": cfg.bucket_width,
                     "split": {"seed": cfg.seed, "test_fraction": cfg.test_fraction,
                               "val_fraction": cfg.val_fraction},
                     "length_calibration": calibration})
    ranker.save(run_dir / "ranker")
    summary = {"val_kendall_tau_by_layers": {str(k): results[k][1] for k in depths}, "layers": best,
               "ranker": str(run_dir / "ranker"), "feature_seconds": feature_seconds,
               "train": len(train_set), "val": len(val), "test": len(test)}
    write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary

