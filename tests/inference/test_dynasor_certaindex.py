"""Certaindex against hand-computed cases: answer extraction and equivalence, cluster entropy, the probe rule."""

from __future__ import annotations

import math

import pytest

from glassbox.inference.dynasor.answers import (MathComparer, TaskComparer, as_number, extract_boxed, normalize,
                                                probe_answer)
from glassbox.inference.dynasor.certaindex import (ProbeResult, answer_entropy, certainty, clusters, hedges,
                                                   majority, probes_agree)

MATH = MathComparer()


def test_extract_boxed_takes_the_last_complete_box_with_nested_braces():
    assert extract_boxed("so \\boxed{3} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("first \\boxed{7} then \\boxed{8") == "7"        # the last box never closed
    assert extract_boxed("no box here") is None


def test_probe_answer_reads_up_to_the_closing_brace():
    assert probe_answer(" 42 }. So the answer") == "42"
    assert probe_answer("\\frac{1}{2}} more") == "\\frac{1}{2}"
    assert probe_answer("42 and still going") is None                     # ran out of tokens inside the box
    assert probe_answer(" } nothing") is None


def test_math_equivalence_by_value_and_format():
    assert normalize(" $1,000$. ") == "1000"
    assert as_number("\\frac{3}{4}") == as_number("0.75")
    assert MATH.equivalent("1/2", "0.50")
    assert MATH.equivalent("\\text{12}", "12.0")
    assert MATH.equivalent("-\\frac{1}{2}", "-0.5")
    assert not MATH.equivalent("12", "13")
    assert not MATH.equivalent("x+1", "x+2")


def test_task_comparer_uses_the_reasoning_gym_scorer():
    rg = pytest.importorskip("reasoning_gym")
    ds = rg.create_dataset("chain_sum", size=1, seed=3)
    entry = ds[0]
    task = TaskComparer(ds, entry)
    assert task.correct(entry["answer"])
    assert not task.correct(str(int(entry["answer"]) + 1))
    assert not task.correct(None)
    assert task.equivalent(entry["answer"], f" {entry['answer']} ")
    assert not task.equivalent(entry["answer"], str(int(entry["answer"]) + 1))


def test_entropy_of_clustered_answers_hand_computed():
    assert answer_entropy(["4", "4", "4", "4"], MATH) == 0.0
    assert certainty(["4", "4", "4", "4"], MATH) == 1.0
    # clusters of 2, 1, 1 of 4: H = -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2; certainty = 1 - 1.5 ln 2 / ln 4 = 0.25
    assert answer_entropy(["4", "4.0", "5", "6"], MATH) == pytest.approx(1.5 * math.log(2))
    assert certainty(["4", "4.0", "5", "6"], MATH) == pytest.approx(0.25)
    # equivalent forms cluster: 3 and 1 of 4
    assert clusters(["1/2", "0.5", "2", "0.50"], MATH) == [[0, 1, 3], [2]]
    assert answer_entropy(["1/2", "0.5", "2", "0.50"], MATH) == pytest.approx(-(0.75 * math.log(0.75)
                                                                                 + 0.25 * math.log(0.25)))


def test_missing_answers_count_as_disagreement():
    assert clusters(["4", None, None], MATH) == [[0], [1], [2]]
    assert certainty(["4", None, None], MATH) == pytest.approx(0.0, abs=1e-12)
    assert certainty([None, None], MATH) == 0.0
    assert certainty(["4"], MATH) == 0.0                                  # one answer is no evidence of agreement
    assert majority([None, "5", "4", "4.0", None], MATH) == "4"
    assert majority(["5", "4"], MATH) == "5"                               # a tie goes to the first seen
    assert majority([None, None], MATH) is None


def test_hedging_words_are_whole_words_in_any_case():
    assert hedges("Hmm, 42")
    assert hedges("42, but maybe")
    assert hedges("WAIT")
    assert not hedges("nothing notable, butter")


def _probe(answer: str | None, text: str | None = None) -> ProbeResult:
    return ProbeResult(answer, text if text is not None else f"{answer}}}")


def test_probes_agree_needs_a_full_window_of_equal_clean_answers():
    assert probes_agree([_probe("4"), _probe("4.0")], 2, MATH)
    assert probes_agree([_probe("9"), _probe("4"), _probe("4")], 2, MATH)   # only the last window counts
    assert not probes_agree([_probe("4")], 2, MATH)                         # too few probes
    assert not probes_agree([], 1, MATH)
    assert not probes_agree([_probe("4"), _probe(None, "4 and")], 2, MATH)  # the box never closed
    assert not probes_agree([_probe("4"), _probe("4", "4}. Wait")], 2, MATH)
    assert probes_agree([_probe("4")], 1, MATH)
    with pytest.raises(ValueError):
        probes_agree([_probe("4")], 0, MATH)


def test_disagreeing_probes_never_settle():
    """The reference servers' bug (their issue #25) exited without the agreement test: every window of answers
    with two different values must stay unsettled, however many probes came before."""
    history: list[ProbeResult] = []
    for i in range(12):
        history.append(_probe(str(i % 2)))                                  # 0, 1, 0, 1, ...
        for window in (2, 3, 4):
            assert not probes_agree(history, window, MATH)
