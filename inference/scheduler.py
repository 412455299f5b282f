"""Continuous batching: each step picks which sequences compute how many tokens, under a token budget.

Running sequences go first (in policy order), each asking for all of its uncomputed tokens plus the nodes of its
speculative draft, cut to what the budget leaves (a draft loses its last nodes first, so it stays a tree); a long
prompt is therefore split across steps (chunked prefill) while decodes keep flowing in the same batch. When the KV pool runs dry, the lowest-priority running sequence is
preempted: its blocks are freed and it returns to the waiting queue to be recomputed (cheaply, when its prefix
blocks are still cached). Waiting sequences are admitted in policy order only in steps that preempted nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glassbox.inference.block_manager import BlockManager
from glassbox.inference.policy import SchedulingPolicy
from glassbox.inference.sequence import Sequence, Status
from glassbox.inference.speculative.draft import EMPTY, Draft


def draft_cap(num_decoding: int, num_spec_tokens: int, spec_batch_tokens: int) -> int:
    """The most draft nodes one sequence may verify in a step beside `num_decoding` decoding sequences: its own
    cap `num_spec_tokens`, and an equal share of `spec_batch_tokens` for the whole step. A small batch verifies
    long drafts almost for free (a decode step is memory-bound: more rows cost little); a large one is already
    compute-bound, where every rejected node costs as much as a real token, so drafts shrink and vanish."""
    return min(num_spec_tokens, spec_batch_tokens // max(num_decoding, 1))


@dataclass
class ScheduledSeq:
    """`num_tokens` tokens of `seq` from position `start`: its uncomputed real tokens, then `draft`, the nodes of
    its draft (a prefix of `seq.draft`, as far as the budget reached) to verify after its last token."""

    seq: Sequence
    start: int
    num_tokens: int
    draft: Draft = EMPTY

    def __post_init__(self) -> None:
        # Whether this step computes the sequence's last real token, so its logits yield a new token.
        self.samples = self.start + self.num_tokens - len(self.draft) == self.seq.num_tokens

    @property
    def num_spec(self) -> int:
        return len(self.draft)

    def input_ids(self) -> list[int]:
        real = self.seq.token_ids[self.start:self.start + self.num_tokens - len(self.draft)]
        return real + list(self.draft.tokens)

    def positions(self) -> list[int]:
        """Rotary positions: real tokens at their own, a draft node at the last token's plus its depth (where it
        will sit if accepted). Its KV is written at the next free slot in node order (`start + row`); the
        accepted path's KV is moved to its positions after sampling."""
        real = self.num_tokens - len(self.draft)
        pos = list(range(self.start, self.start + real))
        last = self.start + real - 1
        return pos + [last + d for d in self.draft.depths]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        policy: SchedulingPolicy,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.blocks = blocks
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished, drop it from the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish(reason)
        self.blocks.free_seq(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = deque(self.policy.order_running(self.running))
        kept: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            if budget <= 0:
                kept.append(seq)
                continue
            uncomputed = seq.num_tokens - seq.num_computed_tokens
            n = min(uncomputed + len(seq.draft), budget)
            draft = seq.draft.truncated(n - uncomputed) if n > uncomputed else EMPTY
            while not self.blocks.allocate(seq, n):
                if not queue:
                    self._preempt(seq, out)
                    break
                self._preempt(queue.pop(), out)
            else:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n, draft))
                budget -= n
                kept.append(seq)
        self.running = kept
        if out.preempted:
            return out

        for seq in self.policy.order_waiting(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            cached = self.blocks.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            uncomputed = seq.num_tokens - seq.num_computed_tokens - len(cached) * self.blocks.block_size
            n = min(uncomputed, budget)
            if n < uncomputed and not self.enable_chunked_prefill:
                break
            if not self.blocks.allocate(seq, n, cached):
                break
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return out
