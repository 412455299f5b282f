"""Reasoning programs on real generations of a tiny model trained on scripts (dynasor_helpers): certainty stops
self-consistency early and adds samples while uncertain, agreeing probes stop a chain of thought and disagreeing
or hedging ones never do, a program's samples are admitted together, stopping frees everything, and plain requests
come out as they would without programs."""

from __future__ import annotations

import pytest
from dynasor_helpers import PROBE_INTERVAL, PROMPTS, REASONING, scripted_engine, scripted_model

from glassbox.errors import GlassboxError
from glassbox.inference.dynasor.controller import ProgramController, run_programs
from glassbox.inference.dynasor.policy import ProgramPolicy
from glassbox.inference.dynasor.programs import ChainOfThought, ProgramError, ProgramLimits, SelfConsistency
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.sequence import Sequence


@pytest.fixture(scope="module")
def scripted(tokenizer_json):
    return scripted_model(tokenizer_json)


@pytest.fixture
def engine(scripted):
    model, model_dir = scripted
    return scripted_engine(model, model_dir)


def _ids(engine, name: str) -> list[int]:
    return engine.tokenizer.encode(PROMPTS[name])


def _sc(engine, name: str, **kw) -> SelfConsistency:
    return SelfConsistency(_ids(engine, name), max_tokens=64, temperature=0.5, seed=7, **kw)


def _cot(engine, name: str, **kw) -> ChainOfThought:
    return ChainOfThought(_ids(engine, name), max_tokens=64, probe_interval=PROBE_INTERVAL, probe_temperature=0.0,
                          **kw)


def test_self_consistency_stops_once_certain_and_saves_tokens(engine):
    adaptive, plain = run_programs(engine, [_sc(engine, "sure", max_samples=6),
                                            _sc(engine, "sure", max_samples=6, adaptive=False)])
    assert (adaptive.finish_reason, adaptive.answer, adaptive.num_samples) == ("certain", "42", 2)
    assert adaptive.certainty == 1.0
    assert (plain.finish_reason, plain.answer, plain.num_samples) == ("completed", "42", 6)
    assert adaptive.total_tokens * 3 == plain.total_tokens        # 2 of 6 samples of one memorised script
    assert engine.blocks.num_used_blocks == 0


def test_uncertain_self_consistency_gets_more_samples_up_to_its_budget(engine):
    [result] = run_programs(engine, [_sc(engine, "noans", max_samples=6, initial_samples=2, samples_per_round=2)])
    assert (result.finish_reason, result.num_samples, result.answer) == ("completed", 6, None)
    assert result.answers == [None] * 6 and result.certainty == 0.0
    assert engine.blocks.num_used_blocks == 0


def test_agreeing_probes_stop_the_chain_of_thought(engine):
    dyn, plain = run_programs(engine, [_cot(engine, "sure"), _cot(engine, "sure", probes=False)])
    assert (plain.finish_reason, plain.answer, plain.num_probes) == ("completed", "42", 0)
    assert (dyn.finish_reason, dyn.answer) == ("probes_agree", "42")
    assert dyn.num_probes == 2 and dyn.answers == ["42", "42"]
    # Stopped right after the second probe (at 2 intervals; the probe's own steps ran beside it).
    assert 2 * PROBE_INTERVAL <= dyn.output_tokens < plain.output_tokens
    assert dyn.probe_tokens > 0 and dyn.total_tokens == dyn.output_tokens + dyn.probe_tokens
    assert engine.stats()["num_forks"] == 2
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("name,answer", [("alt", "7"), ("hedge", "42")])
def test_disagreeing_or_hedging_probes_never_stop_the_generation(engine, name, answer):
    """The reference servers' early exit skipped the agreement test (their issue #25). Here probes answering 1, 2,
    1 (or agreeing but hedging) leave the generation to run to its own end."""
    [result] = LLM(engine=engine).run_programs([_cot(engine, name)])
    assert result.finish_reason == "completed"
    assert result.num_probes >= 3
    assert result.answer == answer                                   # the generation's own box
    assert result.texts == [REASONING[name]]
    if name == "alt":
        assert result.answers[:3] == ["1", "2", "1"]


def test_stopping_a_program_frees_everything_and_returns_the_answer_so_far(engine):
    controller = ProgramController.of(engine)
    controller.submit("cot", _cot(engine, "alt"))
    controller.submit("sc", _sc(engine, "noans", max_samples=4, adaptive=False))
    engine.step()
    while len(controller.runs["cot"].probes) < 2:
        engine.step()
    controller.stop("cot")
    controller.stop("sc")
    engine.step()
    cot, sc = controller.results.pop("cot"), controller.results.pop("sc")
    assert cot.finish_reason == sc.finish_reason == "stopped"
    assert cot.answer == "2"                                         # the latest probe's answer
    assert sc.num_samples == 4 and sc.output_tokens > 0
    assert not engine.requests and engine.blocks.num_used_blocks == 0


def test_a_programs_samples_are_admitted_together_or_not_at_all(scripted):
    model, model_dir = scripted
    # 12 blocks of 8 tokens. The blocker holds 10 (78 tokens); the program's 4 samples need a block each to start
    # and 2 at most (7 + 8 tokens): with 2 free it must wait for all 4 rather than start 2 now.
    engine = scripted_engine(model, model_dir, num_kv_blocks=12, max_model_len=96, enable_prefix_caching=False)
    engine.add_request("blocker", list(range(70)), SamplingParams(temperature=0, max_tokens=8))
    engine.step()
    controller = ProgramController.of(engine)
    controller.submit("sc", SelfConsistency(_ids(engine, "noans"), max_samples=4, max_tokens=8, adaptive=False))
    sizes = []
    for _ in range(60):
        if "sc" in controller.results:
            break
        engine.step()
        sizes.append(sum(1 for s in engine.scheduler.running if s.group == "sc"))
    assert sizes[0] == 0 and 4 in sizes and set(sizes) <= {0, 4}
    assert controller.results["sc"].num_samples == 4
    with pytest.raises(ProgramError, match="KV blocks"):           # a gang that could never fit is refused
        controller.submit("big", SelfConsistency(_ids(engine, "noans"), max_samples=4, max_tokens=64,
                                                 adaptive=False))


def test_program_policy_ranks_fewer_remaining_tokens_first():
    policy = ProgramPolicy()
    long_a = Sequence("a", [1], SamplingParams(max_tokens=100), arrival_time=0.0, group="long")
    long_b = Sequence("b", [1], SamplingParams(max_tokens=100), arrival_time=0.0, group="long")
    short = Sequence("c", [1], SamplingParams(max_tokens=150), arrival_time=1.0, group="short")
    alone = Sequence("d", [1], SamplingParams(max_tokens=20), arrival_time=2.0)
    # "long" has 200 tokens left over two samples, "short" 150 over one: the program total decides.
    assert policy.rank([long_a, alone, short, long_b]) == [alone, short, long_a, long_b]


def test_plain_greedy_requests_are_unchanged_by_programs_beside_them(scripted):
    model, model_dir = scripted
    prompts = [_ids_for(model_dir, n) for n in ("sure", "alt")] + [[5, 6, 7, 8]]
    greedy = SamplingParams(temperature=0, max_tokens=24)

    alone_engine = scripted_engine(model, model_dir, policy="fcfs")
    alone = []
    for i, p in enumerate(prompts):
        alone_engine.add_request(f"r{i}", p, greedy)
    while alone_engine.has_unfinished():
        alone += [o for o in alone_engine.step() if o.finished]

    engine = scripted_engine(model, model_dir)
    controller = ProgramController.of(engine)
    controller.submit("p1", _sc(engine, "sure", max_samples=4))
    controller.submit("p2", _cot(engine, "hedge"))
    beside = []
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy)
    while engine.has_unfinished():
        beside += [o for o in engine.step() if o.finished]
    ids = {o.request_id for o in beside}
    assert ids == {"r0", "r1", "r2"}                                 # program outputs are not handed on
    by_id = {o.request_id: o.outputs[0].token_ids for o in beside}
    assert by_id == {o.request_id: o.outputs[0].token_ids for o in alone}
    assert set(controller.results) == {"p1", "p2"}


def _ids_for(model_dir, name):
    from glassbox.inference.tokenizer import Tokenizer

    return Tokenizer(model_dir).encode(PROMPTS[name])


def test_bad_programs_are_refused_with_the_field_named(engine):
    controller = ProgramController(engine, ProgramLimits(max_samples=8))
    with pytest.raises(ProgramError, match="max_samples") as e:
        controller.submit("x", _sc(engine, "sure", max_samples=9))
    assert e.value.param == "max_samples"
    with pytest.raises(ProgramError, match="type"):
        controller.submit("x", {"prompt_ids": [1]})
    with pytest.raises(ProgramError, match="probe_window"):
        controller.submit("x", _cot(engine, "sure", probe_window=0))
    with pytest.raises(GlassboxError, match="exceeds the model's context"):
        controller.submit("x", SelfConsistency([1] * 250, max_tokens=40))
    controller.submit("x", _sc(engine, "sure"))
    with pytest.raises(GlassboxError, match="already in use"):
        controller.submit("x", _sc(engine, "sure"))


def test_program_policy_promotes_a_starved_program():
    from glassbox.inference.policy import SchedulerState

    policy = ProgramPolicy(starvation_steps=2, promote_steps=1)
    long_a = Sequence("a", [1], SamplingParams(max_tokens=500), arrival_time=0.0, group="long")
    short = Sequence("b", [1], SamplingParams(max_tokens=10), arrival_time=1.0, group="short")
    for step in (1, 2):                              # the long program is passed over twice
        assert policy.rank([long_a, short]) == [short, long_a]
        policy.on_step(SchedulerState(step, [long_a, short], {short.seq_id}))
    assert policy.rank([long_a, short]) == [long_a, short]
