"""One sequence's state as the engine sees it: its tokens and how many of them already have KV in the cache.

Tracking `num_computed_tokens` (as vLLM V1 does) makes chunked prefill, prefix-cache hits, speculative rollback and
recompute preemption one mechanism: each step computes tokens [num_computed_tokens, len(token_ids)) in part or
whole, and a sequence samples a new token only once every token it has is computed.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from glassbox.inference.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives as (token id, logprob) pairs, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    priority: float = 0.0

    def __post_init__(self) -> None:
        self.seq_id = next(_ids)
        self.token_ids: list[int] = list(self.prompt_ids)
        self.prompt_len = len(self.prompt_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.spec_tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """True while more than the last token still lacks KV (a fresh prompt, or one recomputed after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
