"""Per-checkpoint measurements shared by the release build and `glassbox release analyze`.

Losses and weight norms run glassbox's own Transformer on a loaded export (`load_hf_model_dir`); greedy
continuations use transformers' cached `generate` on the same export (a full forward per generated token would
cost ~prompt-length times more). Everything is fp32 in fixed batches, so the numbers are the same every time
the same checkpoint is measured.
"""

from __future__ import annotations

import numpy as np
import torch

from glassbox.errors import GlassboxError


@torch.no_grad()
def greedy_continue(hf_model: torch.nn.Module, prompts: torch.Tensor, length: int) -> torch.Tensor:
    """Exactly `length` greedy tokens after each prompt ([P, prompt_len] -> [P, length]) with a transformers model.

    The end-of-text token does not stop generation (the training data runs on past it), and nothing is
    suppressed, so each token is the plain argmax.
    """
    from transformers import GenerationConfig

    hf_model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=length, eos_token_id=None,
                                                  pad_token_id=0)
    out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts))
    return out[:, prompts.shape[1]:]


def memorization_scores(hf_model: torch.nn.Module, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Per sequence: the fraction of the greedy continuation of its first `prompt_len` tokens that equals the rest."""
    prompts, truth = sequences[:, :prompt_len], sequences[:, prompt_len:]
    out = greedy_continue(hf_model, prompts, truth.shape[1])
    return (out == truth).float().mean(dim=1)


def draw_memorization_sequences(chunks: list[np.ndarray], count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` tokens from the training chunks, chosen by `seed` (same windows every time)."""
    samples = np.concatenate([c.reshape(-1, c.shape[-1]) for c in chunks], axis=0)
    if samples.shape[1] < length:
        raise GlassboxError(f"training samples hold {samples.shape[1]} tokens; memorization needs {length}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, samples.shape[0], size=count)
    offsets = rng.integers(0, samples.shape[1] - length + 1, size=count)
    windows = np.stack([samples[r, o:o + length] for r, o in zip(rows, offsets)])
    return torch.from_numpy(windows.astype(np.int64))


@torch.no_grad()
def layer_weight_norms(model: torch.nn.Module) -> tuple[list[str], list[float]]:
    """L2 norm of all weights of each part: embeddings, each transformer layer, the final norm, an untied head."""
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        groups[key] = groups.get(key, 0.0) + p.detach().double().pow(2).sum().item()
    order = ["embed_tokens"] + [f"layers.{i}" for i in range(len(model.layers))] + ["norm", "lm_head"]
    names = [k for k in order if k in groups]
    return names, [groups[k] ** 0.5 for k in names]
