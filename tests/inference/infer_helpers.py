"""Helpers shared by the inference tests."""

from __future__ import annotations

import contextlib
import shutil
from typing import Iterator

import pytest
import torch

from glassbox.inference.sequence import Sequence
from glassbox.inference.speculative import Draft
from glassbox.models.transformer import ModelConfig, Transformer

# torch.compile on a CPU builds C++ kernels: tests that compile skip where no compiler is installed.
needs_cxx_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                        reason="torch.compile on CPU needs a C++ compiler")


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
    """Linear drafts from a known continuation, corrupting every third draft token, so some drafts are
    rejected."""

    name = "scripted"

    def __init__(self, prompt_len: int, continuation: list[int]):
        self.prompt_len = prompt_len
        self.continuation = continuation
        self.calls = 0
        self.finished: list[Sequence] = []

    def propose(self, seqs: list[Sequence], max_tokens: int) -> list[Draft]:
        drafts = []
        for seq in seqs:
            done = seq.num_output_tokens
            draft = list(self.continuation[done:done + max_tokens])
            for j in range(2, len(draft), 3):
                draft[j] = (draft[j] + 1) % 200
            drafts.append(Draft.linear(draft, score=float(len(draft))))
        self.calls += 1
        return drafts

    def on_finished(self, seq: Sequence) -> None:
        self.finished.append(seq)


class ScriptedTreeProposer:
    """Token trees from each sequence's known continuation: at every depth a wrong sibling first and the true
    token second (or only the wrong one, every third depth), plus a wrong branch hanging under the wrong
    sibling, so that verification must skip siblings, follow the second child, stop at a wrong leaf, and move
    the accepted nodes' KV from their tree slots. `continuations` maps a prompt (as a tuple) to its reference
    output; sequences it does not know get no draft."""

    name = "scripted-tree"

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], vocab: int, score: float = 8.0):
        self.continuations = continuations
        self.vocab = vocab
        self.score = score
        self.calls = 0
        self.finished: list[Sequence] = []

    def draft_for(self, seq: Sequence, max_tokens: int) -> Draft:
        ref = self.continuations.get(tuple(seq.prompt_ids))
        if ref is None:
            return Draft()
        done = seq.num_output_tokens
        truth = ref[done:]
        tokens: list[int] = []
        parents: list[int] = []
        on_path = -1
        for depth, tok in enumerate(truth):
            if len(tokens) + 3 > max_tokens:
                break
            wrong = (tok + 1 + depth) % self.vocab
            tokens.append(wrong)
            parents.append(on_path)
            tokens.append((wrong + 1) % self.vocab)          # a child of the wrong sibling: never reachable
            parents.append(len(tokens) - 2)
            if depth % 3 == 2:
                break                                         # only the wrong sibling: verification stops here
            tokens.append(tok)
            parents.append(on_path)
            on_path = len(tokens) - 1
        return Draft(tuple(tokens), tuple(parents), self.score)

    def propose(self, seqs: list[Sequence], max_tokens: int) -> list[Draft]:
        self.calls += 1
        return [self.draft_for(seq, max_tokens) for seq in seqs]

    def on_finished(self, seq: Sequence) -> None:
        self.finished.append(seq)


def tiny_transformer(vocab_size: int = 200, max_seq_len: int = 128) -> Transformer:
    """A random-init two-layer glassbox Transformer, the same one for the same arguments."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=max_seq_len, init_std=0.1)
    return Transformer(cfg).eval()
