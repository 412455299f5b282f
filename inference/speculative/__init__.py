"""The speculative-decoding extension point: a proposer drafts a token tree per decoding sequence each step.

The engine verifies every draft (a `Draft`: tokens plus parent indices) in the same forward as the sequence's last
token, keeps the longest root path verification accepts plus one model token (`Sampler.sample`), moves that path's
KV into place and rolls the rest back through the sequence's computed-token count. A proposer only predicts; it
never changes what the model would output. `suffix` is SuffixDecoding (suffix.py over suffix_tree.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from glassbox.errors import GlassboxError
from glassbox.inference.speculative.draft import EMPTY, Draft
from glassbox.inference.speculative.suffix import SuffixProposer

if TYPE_CHECKING:       # a Sequence holds its Draft, so sequence.py imports this package at import time
    from glassbox.inference.sequence import Sequence

__all__ = ["Draft", "EMPTY", "Proposer", "NoProposer", "PROPOSERS", "make_proposer"]


class Proposer(Protocol):
    name: str

    def propose(self, seqs: list[Sequence], max_tokens: int) -> list[Draft]:
        """A draft of at most `max_tokens` nodes for each decoding sequence (`EMPTY` for none)."""
        ...

    def on_finished(self, seq: Sequence) -> None:
        """Called once per sequence leaving the engine, finished or aborted (`seq.finish_reason` says which):
        the place to learn from its output and to free its per-request state."""
        ...


class NoProposer:
    """Plain decoding: never drafts."""

    name = "none"

    def propose(self, seqs: list[Sequence], max_tokens: int) -> list[Draft]:
        return [EMPTY for _ in seqs]

    def on_finished(self, seq: Sequence) -> None:
        return None


PROPOSERS: dict[str, type] = {"none": NoProposer, "suffix": SuffixProposer}


def make_proposer(name: str) -> Proposer:
    if name not in PROPOSERS:
        raise GlassboxError(f"unknown speculative proposer {name!r} (known: {', '.join(PROPOSERS)})")
    return PROPOSERS[name]()
