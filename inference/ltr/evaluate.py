"""`glassbox ltr eval`: Kendall's tau of a ranker on the held-out prompts, beside two baselines and its cost.

Baselines, both fitted on the same training split:
- prompt length: the longer (or, if the training split says so, the shorter) the prompt, the longer the answer;
- a length-bucket classifier: the ranker's own features, a head of the same size trained with cross-entropy to
  predict the output's length decile, ranked by the expected decile. It isolates what ListMLE adds over
  classifying lengths (the paper's classification baselines reach tau 0.18-0.58).
The ranker's cost is measured too: trunk and head over the test prompts, per prompt, on the device given.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from glassbox.errors import GlassboxError
from glassbox.inference.ltr.collect import load_collection, machine_name
from glassbox.inference.ltr.listmle import kendall_tau
from glassbox.inference.ltr.ranker import Ranker
from glassbox.inference.ltr.train import features_by_layer, lengths_of, split, standardised_head

NUM_CLASSES = 10


def prompt_length_tau(train, test) -> float:
    """Tau of prompt length (its sign fitted on the training split) against shortness on the test split."""
    sign = 1.0 if kendall_tau([len(e.prompt_ids) for e in train], [-e.output_len for e in train]) >= 0 else -1.0
    return kendall_tau([sign * len(e.prompt_ids) for e in test], [-e.output_len for e in test])


def classifier_tau(train_feats: torch.Tensor, train_lengths: torch.Tensor, test_feats: torch.Tensor,
                   test_lengths: torch.Tensor, hidden: int, epochs: int = 200, seed: int = 0) -> float:
    """Tau of a length-decile classifier's expected decile (lower = shorter) on the test split."""
    torch.manual_seed(seed)
    edges = torch.quantile(train_lengths.float(), torch.linspace(0, 1, NUM_CLASSES + 1)[1:-1])
    classes = torch.bucketize(train_lengths.float(), edges)
    head = standardised_head(train_feats, hidden)
    head.mlp[-1] = nn.Linear(hidden, NUM_CLASSES)
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        logits = head.mlp((train_feats - head.mean) / head.std)
        loss = nn.functional.cross_entropy(logits, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        probs = torch.softmax(head.mlp((test_feats - head.mean) / head.std), -1)
        expected = probs @ torch.arange(NUM_CLASSES, dtype=probs.dtype)
    return kendall_tau((-expected).tolist(), (-test_lengths).tolist())


def evaluate(ranker_dir: Path, collection: Path, device: str = "cpu") -> dict:
    meta, examples = load_collection(collection)
    ranker = Ranker.load(ranker_dir, device)
    if ranker.meta["tokenizer_fingerprint"] != meta["tokenizer_fingerprint"]:
        raise GlassboxError(f"ltr eval: {ranker_dir} was trained under another tokenizer than {collection}'s")
    sp = ranker.meta["split"]
    train, _, test = split(examples, sp["seed"], sp["test_fraction"], sp["val_fraction"])
    start = time.perf_counter()
    scores = ranker.score([e.prompt_ids for e in test])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    k = ranker.layers
    train_feats = features_by_layer(ranker.trunk, train, [k], ranker.max_prompt_tokens)[k]
    test_feats = features_by_layer(ranker.trunk, test, [k], ranker.max_prompt_tokens)[k]
    return {
        "kendall_tau": kendall_tau(scores, [-e.output_len for e in test]),
        "baseline_prompt_length_tau": prompt_length_tau(train, test),
        "baseline_bucket_classifier_tau": classifier_tau(train_feats, lengths_of(train), test_feats,
                                                         lengths_of(test), ranker.meta["head_hidden"]),
        "layers": k, "num_test": len(test), "num_train": len(train),
        "score_ms_per_prompt": 1000 * seconds / len(test),
        "test_mean_output_len": float(lengths_of(test).float().mean()),
        "collection": {key: meta[key] for key in ("model_dir", "max_tokens", "num_prompts", "machine")},
        "machine": machine_name(device),
    }
