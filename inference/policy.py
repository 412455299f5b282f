"""Scheduling policies: one joint ranking of running and waiting sequences that drives admission and preemption.

Each step the scheduler hands the policy every unfinished sequence (running and waiting together) and walks the
ranking it returns: a sequence is served in rank order while the token budget, the sequence cap and the KV blocks
last, and when a better-ranked sequence needs room, running sequences ranked below it are preempted from the
bottom up. So a short request can overtake a long one already running, which two separate orderings (running
first, waiting after) cannot express.

A policy also sees the life of a sequence through three hooks: `on_arrival` (a learned ranker scores the prompts
there), `on_step` (after each scheduling decision: the starvation guard counts there) and `on_finish`.

Ranking alone does not decide a preemption: before admission evicts a running sequence for a better-ranked
waiting one, the scheduler asks `may_preempt(victim, candidate)`. The base policy always says yes, except for a
sequence the starvation guard has promoted; a policy whose ranking is an estimate (LTR) says yes only when it
pays (see LTRPolicy). Preemption the KV pool forces (a running sequence out of blocks) is not the policy's to
refuse.

Every policy has the starvation guard: a sequence passed over (a candidate that got no tokens) for
`starvation_steps` consecutive steps is promoted above every unpromoted sequence until it has been served
`promote_steps` steps, then drops back to its own rank with its count reset; and once it has starved, ranking
never preempts it again (admission may not evict it; only the KV pool can). Both halves matter: a promotion that
counted down while the sequence waited for a slot would end unused, and one that let the sequence be preempted
as soon as it dropped back would only buy it `promote_steps` tokens, thrown away and recomputed at the next
promotion (the H200 run of 2026-12-02 preempted 168 times for 70 promotions that way). A shortest-first ranking
needs the guard (LTR turns it on by default), or a long request waits forever behind a stream of short ones; FCFS
and priority leave it off unless asked, as their order is the one the user asked for (under FCFS a promotion could
only put a later arrival first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from glassbox.errors import GlassboxError
from glassbox.inference.sequence import Sequence

# The paper's guard: a request idle for 200 steps is promoted for 10.
DEFAULT_STARVATION_STEPS = 200
DEFAULT_PROMOTE_STEPS = 10


@dataclass
class SchedulerState:
    """What one scheduling step decided, as `on_step` sees it: the candidates the policy ranked, those that got
    tokens this step (by seq_id), and those preempted."""

    step: int
    candidates: list[Sequence]
    scheduled: set[int] = field(default_factory=set)
    preempted: list[Sequence] = field(default_factory=list)


class StarvationGuard:
    """Counts, per sequence, the consecutive steps it was a candidate and got nothing; at `starvation_steps` it is
    promoted until it has been served `promote_steps` steps (steps it waits for a slot do not count), and is
    remembered as `starved` until it finishes. `starvation_steps` None turns the guard off."""

    def __init__(self, starvation_steps: int | None = DEFAULT_STARVATION_STEPS,
                 promote_steps: int = DEFAULT_PROMOTE_STEPS):
        for name, value in (("starvation_steps", starvation_steps), ("promote_steps", promote_steps)):
            if value is None and name == "starvation_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GlassboxError(f"policy option {name}: must be a positive integer, got {value!r}")
        self.starvation_steps = starvation_steps
        self.promote_steps = promote_steps
        self.passed_over: dict[int, int] = {}
        # seq_id -> (steps of promotion left, the step it was promoted at: earlier promotions rank first)
        self.promoted: dict[int, tuple[int, int]] = {}
        # Every sequence promoted so far and unfinished: ranking no longer preempts it.
        self.starved: set[int] = set()
        self.num_promotions = 0

    def promotion(self, seq: Sequence) -> tuple[int, int]:
        """A sort key prefix: (0, promoted at) for a promoted sequence, (1, 0) for the rest."""
        entry = self.promoted.get(seq.seq_id)
        return (0, entry[1]) if entry else (1, 0)

    def update(self, state: SchedulerState) -> None:
        if self.starvation_steps is None:
            return
        for seq in state.candidates:
            sid = seq.seq_id
            if sid in self.promoted:
                left, since = self.promoted[sid]
                if sid not in state.scheduled:
                    continue
                if left > 1:
                    self.promoted[sid] = (left - 1, since)
                else:
                    del self.promoted[sid]
                continue
            if sid in state.scheduled:
                self.passed_over.pop(sid, None)
                continue
            count = self.passed_over.get(sid, 0) + 1
            if count >= self.starvation_steps:
                self.passed_over.pop(sid, None)
                self.promoted[sid] = (self.promote_steps, state.step)
                self.starved.add(sid)
                self.num_promotions += 1
            else:
                self.passed_over[sid] = count

    def forget(self, seq: Sequence) -> None:
        self.passed_over.pop(seq.seq_id, None)
        self.promoted.pop(seq.seq_id, None)
        self.starved.discard(seq.seq_id)


class Policy:
    """The base policy: rank by `key(seq)` (lower first) behind the starvation guard's promotions, ties by arrival
    then sequence id (the n samples of one request arrive together and stay in order). Subclasses supply `key` and,
    where they need them, the hooks; they call the base hooks so the guard keeps counting. The guard is off
    (`starvation_steps` None) unless a subclass or the options turn it on."""

    name = "base"
    # The most sequences the scheduler running this policy admits at once (it sets this); None: unknown.
    max_num_seqs: int | None = None

    def __init__(self, starvation_steps: int | None = None, promote_steps: int = DEFAULT_PROMOTE_STEPS):
        self.guard = StarvationGuard(starvation_steps, promote_steps)

    def key(self, seq: Sequence) -> tuple:
        return ()

    def rank(self, candidates: list[Sequence]) -> list[Sequence]:
        """The candidates to consider this step, best first. Every running candidate must be returned; a waiting
        one left out (a policy not ready to rank it yet) is neither admitted nor counted as passed over."""
        return sorted(candidates, key=lambda s: (self.guard.promotion(s), self.key(s), s.arrival_time, s.seq_id))

    def may_preempt(self, victim: Sequence, candidate: Sequence) -> bool:
        """Whether admitting waiting `candidate`, ranked above running `victim`, may preempt `victim`. Yes, unless
        the victim has starved (see StarvationGuard): once a starved request runs, ranking lets it finish."""
        return victim.seq_id not in self.guard.starved

    def on_arrival(self, seqs: list[Sequence]) -> None:
        """New sequences (the n samples of one request), before their first step."""

    def on_step(self, state: SchedulerState) -> None:
        self.guard.update(state)

    def on_finish(self, seq: Sequence) -> None:
        self.guard.forget(seq)

    def stats(self) -> dict[str, float]:
        return {"policy_promotions": self.guard.num_promotions}

    def close(self) -> None:
        """Release what the policy holds (a scorer thread, a daemon that otherwise lives to the process's end)."""

    @classmethod
    def build(cls, options: dict, tokenizer: Any = None) -> "Policy":
        """The policy from its options (EngineConfig.policy_options); `tokenizer` is the served model's, for a
        policy that must check something against it (a learned ranker)."""
        return cls(**options)


class FCFS(Policy):
    """First come, first served: earliest arrival first, so the latest arrival is preempted first."""

    name = "fcfs"


class Priority(Policy):
    """Lower `priority` value first, then FCFS: a better-priority arrival preempts a worse one already running."""

    name = "priority"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority,)


def _ltr(options: dict, tokenizer: Any = None) -> Policy:
    from glassbox.inference.ltr.policy import LTRPolicy

    return LTRPolicy.build(options, tokenizer)


def _dynasor(options: dict, tokenizer: Any = None) -> Policy:
    from glassbox.inference.dynasor.policy import ProgramPolicy

    return ProgramPolicy.build(options, tokenizer)


# name -> builder(options, served tokenizer). A policy in another module is registered by a builder that imports
# it lazily, so this module imports nothing heavy.
POLICIES: dict[str, Callable[[dict, Any], Policy]] = {"fcfs": FCFS.build, "priority": Priority.build,
                                                      "ltr": _ltr, "dynasor": _dynasor}


def make_policy(name: str, options: dict | None = None, tokenizer: Any = None) -> Policy:
    """Build policy `name` from its options; a GlassboxError names an unknown policy or option."""
    if name not in POLICIES:
        raise GlassboxError(f"unknown scheduling policy {name!r} (known: {', '.join(POLICIES)})")
    try:
        return POLICIES[name](dict(options or {}), tokenizer)
    except TypeError as e:
        raise GlassboxError(f"policy {name!r}: bad options {sorted(options or {})}: {e}") from None
