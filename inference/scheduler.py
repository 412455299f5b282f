"""Continuous batching: each step picks which sequences compute how many tokens, under a token budget.

The policy ranks running and waiting sequences together (`policy.rank`), and the scheduler walks that ranking in
units: a sequence on its own, or every sequence of one `group` (a program's gang). A running sequence asks for all
of its uncomputed tokens plus the nodes of its speculative draft, cut to what the budget leaves (a draft loses its
last nodes first, so it stays a tree); a long prompt is therefore split across steps (chunked prefill) while
decodes keep flowing in the same batch. A waiting unit is admitted when its sequences all get tokens this step,
fit under the sequence cap and get KV blocks, all of them or none.

When a running unit lacks blocks, running units ranked below it are preempted from the bottom up until it fits,
and if none is left it is preempted itself (forced preemption: the pool decides). A waiting unit that lacks
blocks or sequence slots preempts running units ranked below it that the policy lets it preempt
(`policy.may_preempt`: rank preemption, which the policy may refuse where it would not pay), and only if
preempting all of those would make room (a request that cannot get in anyway evicts no one); if they would not,
it is not admitted, and neither is any waiting unit ranked below it, nor below a unit preempted this step
(admission keeps rank order: a large request is not overtaken forever by small ones that happen to fit). Under
FCFS this schedules exactly as the scheduler did before policies ranked jointly.
Preemption is by recompute: the blocks are freed and the sequence waits to be prefilled again. That is what
this engine does best: freed blocks keep their prefix-cache hashes, so a sequence re-admitted soon finds its full
blocks again as prefix hits and recomputes only what was overwritten, whereas swapping would need a host KV pool
and copy streams the runner does not have, and costs PCIe traffic for every preemption even when the blocks were
never reused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from glassbox.errors import GlassboxError
from glassbox.inference.block_manager import BlockManager
from glassbox.inference.policy import Policy, SchedulerState
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
        # The draft's node count, read many times a step per sequence (an attribute, not a call each time), and
        # whether this step computes the sequence's last real token, so its logits yield a new token.
        self.num_spec = len(self.draft)
        self.samples = self.start + self.num_tokens - self.num_spec == self.seq.num_tokens

    def input_ids(self) -> list[int]:
        real = self.seq.token_ids[self.start:self.start + self.num_tokens - self.num_spec]
        return real + list(self.draft.tokens) if self.num_spec else real

    def positions(self) -> list[int]:
        """Rotary positions: real tokens at their own, a draft node at the last token's plus its depth (where it
        will sit if accepted). Its KV is written at the next free slot in node order (`start + row`); the
        accepted path's KV is moved to its positions after sampling."""
        real = self.num_tokens - self.num_spec
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
        policy: Policy,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.blocks = blocks
        self.policy = policy
        policy.max_num_seqs = max_num_seqs
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Of those, the preemptions admission chose (the rest the KV pool forced); and what preemption costs:
        # steps that prefill (no CUDA graph: a pure-decode step replays one) and tokens computed again.
        self.num_rank_preemptions = 0
        self.num_prefill_steps = 0
        self.num_recomputed_tokens = 0
        self.num_steps = 0
        self._group_sizes: Counter[str] = Counter()

    def add(self, seq: Sequence) -> None:
        self.add_all([seq])

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue new sequences (a request's n samples) and tell the policy, which may score them."""
        groups = Counter(s.group for s in seqs if s.group is not None)
        for group, n in groups.items():
            if self._group_sizes[group] + n > self.max_num_seqs:
                raise GlassboxError(f"group {group!r} would hold {self._group_sizes[group] + n} unfinished "
                                    f"sequences; a group is admitted together, so it can hold at most "
                                    f"max_num_seqs = {self.max_num_seqs}")
        self._group_sizes.update(groups)
        for seq in seqs:
            seq.status = Status.WAITING
            self.waiting.append(seq)
        self.policy.on_arrival(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished, drop it from the queues, free its blocks and tell the policy."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.group is not None:
            self._group_sizes[seq.group] -= 1
            if self._group_sizes[seq.group] <= 0:
                del self._group_sizes[seq.group]
        seq.finish(reason)
        self.blocks.free_seq(seq)
        self.policy.on_finish(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free_seq(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
        out.preempted.append(seq)

    def _blocks_to_take(self, plan: list[_Plan]) -> int:
        """Free blocks `plan` takes, as BlockManager.allocate counts them (a cached block shared by two members
        of one plan counts twice if it is on the free list: an overestimate, never an under-)."""
        bm = self.blocks
        total = 0
        for p in plan:
            reused_free = sum(1 for b in p.cached if bm.blocks[b].ref_count == 0)
            need = bm.blocks_needed(p.seq.num_computed_tokens + len(p.cached) * bm.block_size + p.num_tokens)
            total += max(need - len(p.seq.block_table) - len(p.cached), 0) + reused_free
        return total

    def _freeable(self, seqs: list[Sequence]) -> int:
        """Blocks that preempting all of `seqs` would return to the free list (shared ones only if every holder
        is among them)."""
        holders = Counter(b for s in seqs for b in s.block_table)
        return sum(1 for b, n in holders.items() if self.blocks.blocks[b].ref_count == n)

    def _plan_running(self, unit: list[Sequence], budget: int) -> list[_Plan]:
        plan = []
        for seq in unit:
            if budget <= 0:
                break
            uncomputed = seq.num_tokens - seq.num_computed_tokens
            n = min(uncomputed + len(seq.draft), budget)
            draft = seq.draft.truncated(n - uncomputed) if n > uncomputed else EMPTY
            plan.append(_Plan(seq, n, draft))
            budget -= n
        return plan

    def _plan_waiting(self, unit: list[Sequence], budget: int) -> list[_Plan] | None:
        """Every waiting member's first chunk within `budget`, or None if one gets nothing (or, unchunked, less
        than its whole prompt)."""
        plan = []
        for seq in unit:
            cached = self.blocks.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            uncomputed = seq.num_tokens - seq.num_computed_tokens - len(cached) * self.blocks.block_size
            n = min(uncomputed, budget)
            if n <= 0 or (n < uncomputed and not self.enable_chunked_prefill):
                return None
            plan.append(_Plan(seq, n, EMPTY, cached))
            budget -= n
        return plan

    def _make_room(self, plan: list[_Plan], new_seqs: int, units: list[list[Sequence]], below: int,
                   out: SchedulerOutput, in_vain_ok: bool) -> bool:
        """Preempt running units from the end of `units[below:]` (those ranked under the one planning) until `plan`
        gets its blocks and `new_seqs` more sequences fit under the cap; return whether they now do. With `in_vain_ok`
        False nothing is preempted unless preempting all of them would do. A running unit plans with it True, as
        the scheduler always has (FCFS thereby schedules exactly as before policies ranked jointly); admission
        with it False, so that a request that cannot get in anyway evicts no one."""
        def fits() -> bool:
            return (self._blocks_to_take(plan) <= self.blocks.num_free_blocks
                    and len(self.running) + new_seqs <= self.max_num_seqs)

        if fits():
            return True
        victims = [[s for s in unit if s.status is Status.RUNNING] for unit in units[below:]]
        victims = [v for v in victims if v]
        if not in_vain_ok:
            candidate = plan[0].seq
            victims = [v for v in victims if all(self.policy.may_preempt(s, candidate) for s in v)]
        everyone = [s for v in victims for s in v]
        if not in_vain_ok and (self._blocks_to_take(plan) > self.blocks.num_free_blocks + self._freeable(everyone)
                               or len(self.running) - len(everyone) + new_seqs > self.max_num_seqs):
            return False
        while victims and not fits():
            for seq in victims.pop():
                self._preempt(seq, out)
                self.num_rank_preemptions += not in_vain_ok
        return fits()

    def _admit(self, joining: list[_Plan], out: SchedulerOutput) -> bool:
        """Allocate and schedule the waiting members of one unit, all or none. Each member's prefix is matched
        again just before its allocation: an earlier member's fresh blocks may have evicted a free cached block
        the plan counted on (its chunk stays the same size; only more of it is fresh)."""
        done: list[ScheduledSeq] = []
        for p in joining:
            cached = self.blocks.match_prefix(p.seq) if p.cached else []
            if not self.blocks.allocate(p.seq, p.num_tokens, cached):
                for s in done:
                    self.blocks.free_seq(s.seq)
                    out.scheduled.remove(s)
                return False
            done.append(ScheduledSeq(p.seq, p.seq.num_computed_tokens, p.num_tokens))
            out.scheduled.append(done[-1])
        for p in joining:
            self.waiting.remove(p.seq)
            p.seq.status = Status.RUNNING
            self.running.append(p.seq)
        return True

    def _decodes_in_place(self, seq: Sequence) -> bool:
        """A running sequence with one token to compute, no draft, and room for its KV in its last block, under the
        sequence cap: what most units are on most steps. Planning it would allocate nothing and preempt no one
        (its plan fits as it stands), so `schedule` takes it as it is: the host's work per running sequence is a
        real share of a large decode step (bench/engine_host_overhead.py), and planning was much of it."""
        return (seq.status is Status.RUNNING and not seq.draft and seq.num_tokens - seq.num_computed_tokens == 1
                and seq.num_computed_tokens < len(seq.block_table) * self.blocks.block_size
                and len(self.running) <= self.max_num_seqs)

    def _count_prefill(self, out: SchedulerOutput) -> None:
        """Count a step that prefills anything, and the tokens of sequences with output recomputed after a
        preemption (all but the last one, which a decode would have computed anyway)."""
        prefill = [s for s in out.scheduled if s.num_tokens - s.num_spec > 1 or not s.samples]
        self.num_prefill_steps += bool(prefill)
        self.num_recomputed_tokens += sum(min(s.start + s.num_tokens - s.num_spec, s.seq.num_tokens - 1) - s.start
                                          for s in prefill if s.seq.num_output_tokens > 0)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        ranked = self.policy.rank(self.running + self.waiting)
        units = _units(ranked)
        admitting = True
        for i, unit in enumerate(units):
            if budget <= 0:
                break
            if out.preempted and any(s in out.preempted for s in unit):
                admitting = False            # what ranks below a preempted unit must not take its room
                continue
            if len(unit) == 1 and self._decodes_in_place(unit[0]):
                seq = unit[0]
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, 1))
                budget -= 1
                continue
            running = [s for s in unit if s.status is Status.RUNNING]
            waiting = [s for s in unit if s.status is Status.WAITING]
            plan = self._plan_running(running, budget)
            if plan and not self._make_room(plan, 0, units, i + 1, out, in_vain_ok=True):
                for seq in running:          # it cannot fit even alone under the better-ranked: wait its turn
                    self._preempt(seq, out)
                admitting = False
                continue
            for p in plan:
                if not self.blocks.allocate(p.seq, p.num_tokens):
                    raise GlassboxError(f"scheduler: sequence {p.seq.request_id} was promised KV blocks it did "
                                        "not get (a block-accounting bug)")
                out.scheduled.append(ScheduledSeq(p.seq, p.seq.num_computed_tokens, p.num_tokens, p.draft))
                budget -= p.num_tokens
            if not (admitting and waiting):
                continue
            joining = self._plan_waiting(waiting, budget)
            if (joining and self._make_room(joining, len(waiting), units, i + 1, out, in_vain_ok=False)
                    and self._admit(joining, out)):
                budget -= sum(p.num_tokens for p in joining)
            else:
                admitting = False
        self.num_steps += 1
        self._count_prefill(out)
        self.policy.on_step(SchedulerState(self.num_steps, ranked, {s.seq.seq_id for s in out.scheduled},
                                           out.preempted))
        return out


@dataclass
class _Plan:
    """What one sequence would compute this step: `num_tokens` from its computed count, `draft` nodes among
    them, after taking the prefix-cache blocks `cached`."""

    seq: Sequence
    num_tokens: int
    draft: Draft = EMPTY
    cached: list[int] = field(default_factory=list)


def _units(ranked: list[Sequence]) -> list[list[Sequence]]:
    """The ranking cut into scheduling units, each at the rank of its best member: one per group (its members in
    rank order), one per ungrouped sequence."""
    units: list[list[Sequence]] = []
    by_group: dict[str, list[Sequence]] = {}
    for seq in ranked:
        if seq.group is None:
            units.append([seq])
        elif seq.group in by_group:
            by_group[seq.group].append(seq)
        else:
            by_group[seq.group] = [seq]
            units.append(by_group[seq.group])
    return units
