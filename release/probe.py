"""The fixed logit probe: a few token ids run through each exported checkpoint with transformers.

At build time each branch's logits on the probe are summarised into release.json; `release verify` loads every
branch again with transformers, offline, and compares. The summary is small (per position: the max logit, the
log-sum-exp over the vocabulary and the logits of a few fixed token ids) yet moves with any weight that matters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glassbox.errors import GlassboxError

PROBE_IDS_WATCHED = 8


def watched_ids(vocab_size: int) -> list[int]:
    """Token ids spread evenly over the vocabulary whose logits are recorded."""
    n = min(PROBE_IDS_WATCHED, vocab_size)
    return sorted({round(i * (vocab_size - 1) / max(n - 1, 1)) for i in range(n)})


def load_transformers_model(model_dir: Path) -> torch.nn.Module:
    """Load an export with transformers' AutoModelForCausalLM from local files only (never the network)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    except Exception as e:   # transformers raises OSError/ValueError/safetensors errors for a bad directory
        raise GlassboxError(f"{model_dir}: transformers cannot load it: {type(e).__name__}: {e}") from None


@torch.no_grad()
def probe_summary(model: torch.nn.Module, probe_ids: list[int]) -> dict[str, list]:
    logits = model(torch.tensor([probe_ids])).logits[0].float()
    ids = watched_ids(logits.shape[-1])
    return {
        "max": logits.max(dim=-1).values.tolist(),
        "logsumexp": torch.logsumexp(logits, dim=-1).tolist(),
        "watched_ids": ids,
        "watched": logits[:, ids].tolist(),
    }


def compare_summaries(recorded: dict, measured: dict) -> float | None:
    """The largest absolute difference, or None when the two summaries do not even have the same shape."""
    if recorded.get("watched_ids") != measured["watched_ids"]:
        return None
    worst = 0.0
    for key in ("max", "logsumexp", "watched"):
        a = torch.tensor(recorded.get(key, []), dtype=torch.float64)
        b = torch.tensor(measured[key], dtype=torch.float64)
        if a.shape != b.shape:
            return None
        if a.numel():
            worst = max(worst, (a - b).abs().max().item())
    return worst
