"""Dynasor's program ordering: the program with the fewest tokens left to generate goes first.

Shortest-remaining-first cuts mean latency when jobs are programs: a program finishes only when all of its
samples do, so it is ranked by the tokens its unfinished sequences may still generate, summed over the program
(its scheduler group), and its sequences share that rank, so the scheduler keeps the gang together. A sequence
outside any program is a program of one. The base policy's starvation guard, turned on by the policy options
(`starvation_steps`), promotes anything passed over too long, so a long program is not starved by a stream of
short ones. It is off by default: a promoted waiting gang preempts running ones, and in a batch whose programs
wait whole generations (hundreds of steps) for their turn the guard's default of 200 steps would only trade
finished work for recomputation. Ties go to the program that arrived first.
"""

from __future__ import annotations

from glassbox.inference.policy import Policy
from glassbox.inference.sequence import Sequence

# What a sequence with no max_tokens may still generate, for ranking: more than any bounded one.
UNBOUNDED = 1 << 30


def tokens_left(seq: Sequence) -> int:
    """The most tokens `seq` may still generate (its max_tokens less what it has)."""
    if seq.params.max_tokens is None:
        return UNBOUNDED
    return max(seq.params.max_tokens - seq.num_output_tokens, 0)


class ProgramPolicy(Policy):
    name = "dynasor"

    def rank(self, candidates: list[Sequence]) -> list[Sequence]:
        left: dict[str, int] = {}
        arrived: dict[str, float] = {}
        for seq in candidates:
            if seq.group is not None:
                left[seq.group] = left.get(seq.group, 0) + tokens_left(seq)
                arrived[seq.group] = min(arrived.get(seq.group, seq.arrival_time), seq.arrival_time)

        def key(seq: Sequence) -> tuple:
            if seq.group is None:
                return (self.guard.promotion(seq), tokens_left(seq), seq.arrival_time, "", seq.seq_id)
            return (self.guard.promotion(seq), left[seq.group], arrived[seq.group], seq.group, seq.seq_id)

        return sorted(candidates, key=key)
