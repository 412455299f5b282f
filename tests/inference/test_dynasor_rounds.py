"""Self-consistency rounds, which set a program's latency: the first disagreement starts every remaining sample
at once (at most two rounds), without waiting for the round's stragglers, and a vote the samples still to come
cannot overturn ends the program. Driven answer by answer through a stand-in engine, then on the scripted model's
real generations (dynasor_helpers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from dynasor_helpers import PROMPTS, scripted_engine, scripted_model

from glassbox.inference.dynasor.controller import _SelfConsistencyRun, run_programs
from glassbox.inference.dynasor.programs import SelfConsistency
from glassbox.inference.engine import CompletionOutput, RequestOutput


class StandInEngine:
    """Records the requests a run starts; the test finishes samples itself."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_request(self, rid: str, prompt_ids, params, arrival_time=None, group=None) -> None:
        self.added.append(rid)


class Harness:
    """One self-consistency run on a stand-in engine, and the sizes of the rounds it started."""

    def __init__(self, **settings) -> None:
        self.run = _SelfConsistencyRun("p", SelfConsistency([1, 2, 3], **settings), None, 0.0)
        self.controller = SimpleNamespace(owner={})
        self.engine = StandInEngine()
        self.run.start(self.controller, self.engine)
        self.launches = [len(self.engine.added)]

    def finish(self, sample: int, answer: str | None) -> str | None:
        """Sample `sample` ends, boxing `answer` (no box for None); the run's decision after it."""
        text = "so it is" + (f" \\boxed{{{answer}}}" if answer is not None else "")
        out = RequestOutput(f"p/s{sample}", [1, 2, 3], [CompletionOutput(0, [7] * 10, text, "stop", None)], True)
        before = len(self.engine.added)
        self.run.on_output(self.controller, self.engine, out)
        reason = self.run.advance(self.controller, self.engine)
        if len(self.engine.added) > before:
            self.launches.append(len(self.engine.added) - before)
        return reason


def test_a_disagreement_starts_every_remaining_sample_at_once():
    h = Harness(max_samples=8, initial_samples=2, samples_per_round=2)
    assert h.finish(0, "1") is None
    assert h.finish(1, "2") is None
    assert h.launches == [2, 6]                       # two rounds in all, not four of two
    reasons = [h.finish(i, str(i)) for i in range(2, 8)]
    assert reasons[-1] == "completed" and h.run.launched == 8 and h.launches == [2, 6]


def test_rounds_without_escalation_wait_for_every_sample():
    h = Harness(max_samples=8, initial_samples=2, samples_per_round=2, escalate=False)
    assert [h.finish(i, str(i)) for i in range(8)] == [None] * 7 + ["completed"]
    assert h.launches == [2, 2, 2, 2]


def test_the_next_round_does_not_wait_for_stragglers():
    h = Harness(max_samples=8, initial_samples=4)
    assert h.finish(0, "1") is None
    assert h.finish(1, "2") is None
    assert h.launches == [4, 4] and set(h.run.live) == {f"p/s{i}" for i in range(2, 8)}
    # Without escalation the same disagreement starts nothing while samples 2 and 3 run.
    h = Harness(max_samples=8, initial_samples=4, escalate=False)
    h.finish(0, "1")
    h.finish(1, "2")
    assert h.launches == [4]


def test_agreement_ends_the_program_without_its_stragglers():
    h = Harness(max_samples=8, initial_samples=4)
    assert h.finish(0, "5") is None
    assert h.finish(1, "5.0") == "certain"            # equal by value; samples 2 and 3 are cut, none started
    assert h.launches == [4]


@pytest.mark.parametrize("answers,reason", [
    (["1", "2", "1", "1"], "decided"),                # 3 against 1 with 1 to come: the vote cannot turn
    (["1", "2", "1"], None),                          # 2 against 1 with 2 to come: it could
    (["1", None, "1", None], "decided"),              # no answer is no vote: 2 against 0 with 1 to come
])
def test_a_decided_vote_ends_the_program(answers, reason):
    h = Harness(max_samples=5, initial_samples=5)
    decisions = [h.finish(i, a) for i, a in enumerate(answers)]
    assert decisions == [None] * (len(answers) - 1) + [reason]


@pytest.fixture(scope="module")
def scripted(tokenizer_json):
    return scripted_model(tokenizer_json)


def test_an_uncertain_program_takes_two_generations_not_four(scripted):
    """On real generations: a script that never boxes an answer is never certain, so all 8 samples run; escalated
    in two rounds it takes about half the steps of four rounds of two, for the same tokens."""
    model, model_dir = scripted
    steps, results = {}, {}
    for escalate in (True, False):
        engine = scripted_engine(model, model_dir)
        spec = SelfConsistency(engine.tokenizer.encode(PROMPTS["noans"]), max_samples=8, max_tokens=64,
                               temperature=0.0, escalate=escalate)
        [results[escalate]] = run_programs(engine, [spec])
        steps[escalate] = engine.num_steps
    assert results[True].num_samples == results[False].num_samples == 8
    assert results[True].output_tokens == results[False].output_tokens
    assert steps[True] * 1.8 < steps[False]
