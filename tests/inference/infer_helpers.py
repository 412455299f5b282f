"""Helpers shared by the inference tests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from glassbox.inference.sequence import Sequence
from glassbox.models.transformer import ModelConfig, Transformer


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run several times faster on one intra-op thread when the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ScriptedProposer:
    """Drafts from a known continuation, corrupting every third draft token, so some drafts are rejected."""

    name = "scripted"

    def __init__(self, prompt_len: int, continuation: list[int]):
        self.prompt_len = prompt_len
        self.continuation = continuation
        self.calls = 0

    def propose(self, seqs: list[Sequence], max_tokens: int) -> list[list[int]]:
        drafts = []
        for seq in seqs:
            done = seq.num_output_tokens
            draft = list(self.continuation[done:done + max_tokens])
            for j in range(2, len(draft), 3):
                draft[j] = (draft[j] + 1) % 200
            drafts.append(draft)
        self.calls += 1
        return drafts

    def on_finished(self, seq: Sequence) -> None:
        return None


def tiny_transformer(vocab_size: int = 200, max_seq_len: int = 128) -> Transformer:
    """A random-init two-layer glassbox Transformer, the same one for the same arguments."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=max_seq_len, init_std=0.1)
    return Transformer(cfg).eval()
