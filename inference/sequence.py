"""One sequence's state as the engine sees it: its tokens and how many of them already have KV in the cache.

Tracking `num_computed_tokens` (as vLLM V1 does) makes chunked prefill, prefix-cache hits, speculative rollback and
recompute preemption one mechanism: each step computes tokens [num_computed_tokens, len(token_ids)) in part or
whole, and a sequence samples a new token only once every token it has is computed.

The sequence owns that count and its speculative draft: they change only through its methods (`computed`,
`cached`, `forget_kv`, `set_draft`, `verified`), which the block manager, the scheduler and the engine call, so
each rule (what a prefix hit adds, what a verified draft leaves computed, what preemption resets) lives in one place.
"""

from __future__ import annotations

import enum
import itertools
import random
import time
from dataclasses import dataclass, field


from glassbox.errors import GlassboxError
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.speculative.draft import EMPTY, Draft


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
    # A program id: the scheduler admits a group's waiting sequences together or not at all, and preempts its
    # running ones together (Dynasor schedules a reasoning program's samples as one gang).
    group: str | None = None

    def __post_init__(self) -> None:
        self.seq_id = next(_ids)
        self.token_ids: list[int] = list(self.prompt_ids)
        self.prompt_len = len(self.prompt_ids)
        self._num_computed = 0
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self._draft: Draft = EMPTY
        self.logprobs: list[TokenLogprob] = []
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        # A seeded sequence's own uniforms (Sampler): Python's generator, a fraction of a microsecond a draw, where a
        # torch draw of one value costs a few (once per sampled sequence per step, on the host, the card waiting).
        self.generator: random.Random | None = None
        if self.params.seed is not None:
            self.generator = random.Random(self.params.seed + self.index)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is in the cache at their own positions: always a prefix of `token_ids`."""
        return self._num_computed

    @property
    def draft(self) -> Draft:
        """The speculative draft to verify after the last token this step (EMPTY for none)."""
        return self._draft

    def computed(self, n: int) -> None:
        """A prefill chunk of `n` tokens (short of the last one) now has KV."""
        if not 0 <= n < self.num_tokens - self._num_computed:
            raise GlassboxError(f"sequence {self.request_id}: {n} computed tokens leave no last token to sample "
                                f"({self._num_computed} of {self.num_tokens} computed)")
        self._num_computed += n

    def cached(self, n: int) -> None:
        """`n` tokens were found in the prefix cache: their KV is shared, not computed."""
        self.computed(n)
        self.num_cached_tokens = n

    def forget_kv(self) -> None:
        """Every block is gone (preemption or finish): recompute from the start, and drop the draft."""
        self._num_computed = 0
        self._draft = EMPTY

    def set_draft(self, draft: Draft) -> None:
        """Attach a draft; only a decoding sequence (one uncomputed token) can verify one."""
        if len(draft) and self.is_prefilling:
            raise GlassboxError(f"sequence {self.request_id}: a draft needs a decoding sequence, this one has "
                                f"{self.num_tokens - self._num_computed} uncomputed tokens")
        self._draft = draft

    def verified(self, accepted: list[int]) -> None:
        """The step computed the last token and verified the draft: `accepted` is the accepted path's tokens
        plus the model's own next token (or a prefix of them, where a stop rule ends the output). The path's KV is
        at its positions (the runner moved it there), so all but the new last token are computed; the tokens join
        the sequence and the draft is spent."""
        if not accepted:
            raise GlassboxError(f"sequence {self.request_id}: verification accepted no token")
        self._num_computed = self.num_tokens + len(accepted) - 1
        self.token_ids.extend(accepted)
        self._draft = EMPTY

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
