"""Greedy text continuation from a trained model: the demo's quick look at what the model learned.

No KV cache: each new token re-runs the (tiny) model over the last `max_seq_len` tokens, which keeps this
readable; the inference engine is the fast path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glassbox.models.transformer import Transformer


@torch.no_grad()
def greedy_tokens(model: Transformer, ids: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
    """Append the arg-max token `max_new_tokens` times (or until `stop_id`); returns only the new ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = list(ids)
    for _ in range(max_new_tokens):
        window = torch.tensor([out[-model.config.max_seq_len:]], device=device)
        next_id = int(model(window)[0, -1].argmax())
        if next_id == stop_id:
            break
        out.append(next_id)
    model.train(was_training)
    return out[len(ids):]


def greedy_sample(model: Transformer, tokenizer_path: str | Path, prompt: str, max_new_tokens: int = 48,
                  stop_id: int | None = None) -> str:
    """Prompt text -> prompt plus its greedy continuation, decoded with the run's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = tok.encode(prompt).ids
    return tok.decode(ids + greedy_tokens(model, ids, max_new_tokens, stop_id))
