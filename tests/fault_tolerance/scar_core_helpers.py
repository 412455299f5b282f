"""A tiny real model and AdamW for the SCAR core tests (imported by name: test folders are not packages)."""

from __future__ import annotations

import torch

from glassbox.models.transformer import ModelConfig, Transformer


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=24, max_seq_len=16, tie_embeddings=True)


def trained(steps: int = 2, seed: int = 0, lr: float = 1e-2) -> tuple[Transformer, torch.optim.AdamW]:
    """A model and optimizer after `steps` real AdamW steps on random tokens (moments are non-zero)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    train(model, optimizer, steps)
    return model, optimizer


def train(model: Transformer, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
