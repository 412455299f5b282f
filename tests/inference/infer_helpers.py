"""Helpers shared by the inference tests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from glassbox.inference.sequence import Sequence


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
