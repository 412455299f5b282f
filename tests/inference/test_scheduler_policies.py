"""The scheduler's joint ranking: admission and preemption in rank order, the starvation guard, group (gang)
admission and preemption, and greedy outputs that do not depend on the policy."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_transformer

from glassbox.errors import GlassboxError
from glassbox.inference.block_manager import BlockManager
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.policy import FCFS, Policy, Priority, make_policy
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.scheduler import Scheduler
from glassbox.inference.sequence import Sequence, Status

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _seq(name: str, length: int, arrival: float, priority: float = 0.0, group: str | None = None) -> Sequence:
    return Sequence(name, list(range(1, length + 1)), GREEDY, arrival_time=arrival, priority=priority, group=group)


def _step(sched: Scheduler) -> list[str]:
    """One schedule, with every scheduled sequence's tokens marked computed as the engine would (a sampled one
    gets token 7), so the next schedule sees decodes. Returns the scheduled request ids."""
    out = sched.schedule()
    for s in out.scheduled:
        if s.samples:
            s.seq.verified([7])
        else:
            s.seq.computed(s.num_tokens)
    return [s.seq.request_id for s in out.scheduled]


def test_a_better_ranked_arrival_preempts_a_running_sequence_for_its_slot():
    sched = Scheduler(BlockManager(64, 4), Priority(), max_num_seqs=1, max_num_batched_tokens=64)
    sched.add(_seq("low", 5, 0.0, priority=5))
    assert _step(sched) == ["low"] and _step(sched) == ["low"]
    sched.add(_seq("high", 5, 1.0, priority=0))
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["low"]
    assert [s.seq.request_id for s in out.scheduled] == ["high"]
    assert [s.request_id for s in sched.running] == ["high"] and sched.waiting[0].num_computed_tokens == 0
    # FCFS ranks by arrival: the same later arrival waits for the slot.
    fcfs = Scheduler(BlockManager(64, 4), FCFS(), max_num_seqs=1, max_num_batched_tokens=64)
    fcfs.add(_seq("first", 5, 0.0, priority=5))
    _step(fcfs)
    fcfs.add(_seq("second", 5, 1.0, priority=0))
    assert _step(fcfs) == ["first"] and not fcfs.schedule().preempted


def test_admission_preempts_for_blocks_only_when_that_makes_room():
    # 6 blocks of 4 tokens. "low" holds 3 (a 10-token prompt, computed); "mid" holds 2.
    sched = Scheduler(BlockManager(6, 4, enable_prefix_caching=False), Priority(), max_num_seqs=8,
                      max_num_batched_tokens=64)
    sched.add(_seq("low", 10, 0.0, priority=5))
    sched.add(_seq("mid", 6, 0.0, priority=3))
    assert sorted(_step(sched)) == ["low", "mid"]
    # A 30-token prompt needs 8 blocks: more than the pool, so nothing is preempted for it, and "worse", ranked
    # below it, is not admitted ahead of it although it would fit.
    sched.add(_seq("huge", 30, 1.0, priority=0))
    sched.add(_seq("worse", 2, 1.0, priority=9))
    out = sched.schedule()
    assert not out.preempted and sorted(s.seq.request_id for s in out.scheduled) == ["low", "mid"]
    sched.finish(next(s for s in sched.waiting if s.request_id == "huge"), "abort")
    for s in out.scheduled:
        s.seq.verified([7])
    # A 12-token prompt needs 3 blocks; 1 is free: preempting "low" (3 blocks) makes room, "mid" keeps running.
    sched.add(_seq("short", 12, 2.0, priority=1))
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["low"]
    assert sorted(s.seq.request_id for s in out.scheduled) == ["mid", "short"]
    assert {s.request_id for s in sched.waiting} == {"low", "worse"}


def test_starvation_guard_promotes_after_n_steps_for_m_steps():
    policy = Priority(starvation_steps=3, promote_steps=2)
    sched = Scheduler(BlockManager(64, 4), policy, max_num_seqs=1, max_num_batched_tokens=64)
    sched.add(_seq("vip", 4, 0.0, priority=0))
    sched.add(_seq("starved", 4, 0.0, priority=9))
    vip, starved = sched.waiting
    served = [_step(sched) for _ in range(9)]
    # Passed over in steps 1-3, "starved" is promoted (preempting "vip") until served 2 steps; back at its own rank
    # it is not preempted for "vip" again (that would throw its tokens away for nothing: it would be promoted again
    # and again, recomputed each time), so it runs on.
    assert served == [["vip"]] * 3 + [["starved"]] * 6
    assert sched.num_preemptions == sched.num_rank_preemptions == 1
    assert starved.seq_id not in policy.guard.promoted and starved.seq_id in policy.guard.starved
    # "vip", passed over in steps 4-6, is promoted in turn; it cannot preempt a starved request, and waiting for
    # the slot does not use up its promotion.
    assert policy.guard.promoted[vip.seq_id] == (2, 6) and policy.stats()["policy_promotions"] == 2
    sched.finish(starved, "stop")
    assert [_step(sched) for _ in range(3)] == [["vip"]] * 3
    assert vip.seq_id not in policy.guard.promoted and not policy.guard.starved - {vip.seq_id}
    with pytest.raises(GlassboxError, match="starvation_steps"):
        make_policy("priority", {"starvation_steps": 0})
    with pytest.raises(GlassboxError, match="bad options"):
        make_policy("fcfs", {"no_such_option": 1})


def test_a_group_is_admitted_together_or_not_at_all():
    sched = Scheduler(BlockManager(64, 4), FCFS(), max_num_seqs=3, max_num_batched_tokens=64)
    sched.add(_seq("solo", 4, 0.0))
    _step(sched)
    sched.add_all([_seq(f"g{i}", 4, 1.0, group="prog") for i in range(3)])
    sched.add(_seq("later", 4, 2.0))
    # Two free slots for a gang of three: none of it is admitted, and "later" does not jump the queue.
    assert _step(sched) == ["solo"]
    sched.finish(sched.running[0], "stop")
    assert sorted(_step(sched)) == ["g0", "g1", "g2"]
    # A group larger than the sequence cap could never be admitted: refused when added.
    with pytest.raises(GlassboxError, match="group 'prog' would hold 4"):
        sched.add(_seq("g3", 4, 3.0, group="prog"))


def test_a_group_is_preempted_together():
    # 5 blocks of 4: the gang of two (8-token prompts: 2 blocks each once decoding) and "solo" (1 block).
    sched = Scheduler(BlockManager(5, 4, enable_prefix_caching=False), FCFS(), max_num_seqs=8,
                      max_num_batched_tokens=64)
    sched.add(_seq("solo", 3, 0.0))
    sched.add_all([_seq(f"g{i}", 7, 1.0, group="prog") for i in range(2)])
    assert sorted(_step(sched)) == ["g0", "g1", "solo"]
    assert sorted(_step(sched)) == ["g0", "g1", "solo"]
    # solo needs a second block for its 5th token, none is free: the gang, ranked below, goes as a whole.
    out = sched.schedule()
    assert sorted(s.request_id for s in out.preempted) == ["g0", "g1"]
    assert all(s.status is Status.WAITING and not s.block_table for s in out.preempted)


class _Reversed(Policy):
    """Latest arrival first: the opposite of FCFS, so preemption and re-admission happen all the time."""

    name = "reversed"

    def key(self, seq: Sequence) -> tuple:
        return (-seq.arrival_time,)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(200, max_seq_len=128)


def test_greedy_outputs_do_not_depend_on_the_policy(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 200, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (10,),
                                                                                             generator=g)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(policy: str, options: dict | None = None, custom: Policy | None = None, priorities=None):
        # 24 blocks of 4 tokens hold about 2 of these sequences at full length: the scheduler preempts.
        cfg = EngineConfig(block_size=4, num_kv_blocks=24, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                           policy=policy, policy_options=options or {})
        eng = LLMEngine(model, config=cfg)
        if custom is not None:
            eng.scheduler.policy = custom
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params, arrival_time=float(i), priority=(priorities or [0] * 10)[i])
        done = {}
        while eng.has_unfinished():
            for out in eng.step(unfinished_outputs=False):
                done[out.request_id] = out.outputs[0].token_ids
        return [done[str(i)] for i in range(len(prompts))], eng.scheduler.num_preemptions

    reference, _ = run("fcfs")
    reference_big = [o.outputs[0].token_ids for o in LLM(engine=LLMEngine(
        model, config=EngineConfig(block_size=4, num_kv_blocks=512))).generate(prompts, params)]
    assert reference == reference_big
    for outputs, preemptions in (run("priority", priorities=[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]),
                                 run("priority", {"starvation_steps": 2, "promote_steps": 1},
                                     priorities=[9 - i for i in range(10)]),
                                 run("fcfs", custom=_Reversed(starvation_steps=3, promote_steps=2))):
        assert outputs == reference
        assert preemptions > 0
