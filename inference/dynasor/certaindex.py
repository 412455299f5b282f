"""Certaindex: how settled a reasoning program's answer is, from the answers it has produced so far.

Self-consistency: the n finished samples' answers are grouped into clusters of equivalent answers (by the task's
comparer) and the entropy of the cluster sizes, H = -sum (|C|/n) log(|C|/n), measures disagreement: 0 when every
sample agrees, log n when no two do. Certainty is 1 - H / log n. A sample with no answer is a cluster of its own:
failing to answer is evidence of uncertainty, not an abstention to ignore.

Chain of thought: the probes' answers. The generation is settled once the last k probes all gave a non-empty
answer, all equivalent, none hedging ("wait", "hmm", ...: a model about to reconsider). All three conditions are
checked every time; a window with fewer than k probes is never settled (the reference servers' early exit skipped
the agreement test, their issue #25).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from glassbox.inference.dynasor.answers import Comparer

# Words after which a model tends to revise its answer (the Dynasor paper's list).
HEDGING_WORDS = ("wait", "hold", "but", "okay", "no", "hmm")
_HEDGING = re.compile(r"\b(" + "|".join(HEDGING_WORDS) + r")\b", re.IGNORECASE)


def clusters(answers: Sequence[str | None], comparer: Comparer) -> list[list[int]]:
    """Indices of `answers` grouped by equivalence, in order of first appearance; each None is its own group.
    An answer joins the first group whose first answer it matches (equivalence is taken as transitive)."""
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is not None:
            home = next((g for g in groups if answers[g[0]] is not None
                         and comparer.equivalent(answers[g[0]], answer)), None)
            if home is not None:
                home.append(i)
                continue
        groups.append([i])
    return groups


def answer_entropy(answers: Sequence[str | None], comparer: Comparer) -> float:
    """H = -sum p log p over the clusters of `answers` (natural log); 0 for no answers."""
    n = len(answers)
    return -sum(len(g) / n * math.log(len(g) / n) for g in clusters(answers, comparer)) if n else 0.0


def certainty(answers: Sequence[str | None], comparer: Comparer) -> float:
    """1 - H / log n, in [0, 1]: 1 when all n answers agree (and are answers). Fewer than 2 answers give no evidence
    of agreement: 0 (and so does a lone None among them)."""
    n = len(answers)
    if n < 2:
        return 0.0
    if all(a is None for a in answers):
        return 0.0
    return max(0.0, 1.0 - answer_entropy(answers, comparer) / math.log(n))


def majority(answers: Sequence[str | None], comparer: Comparer) -> str | None:
    """The first answer of the largest cluster of real answers (ties: the one seen first); None if there is none."""
    real = [g for g in clusters(answers, comparer) if answers[g[0]] is not None]
    if not real:
        return None
    return answers[max(real, key=len)[0]]


def hedges(text: str) -> bool:
    """Whether `text` contains a hedging word as a whole word, in any case."""
    return _HEDGING.search(text) is not None


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the answer it gave (None for none) and its whole generated text, which the hedging rule reads."""

    answer: str | None
    text: str


def probes_agree(probes: Sequence[ProbeResult], window: int, comparer: Comparer) -> bool:
    """Whether the last `window` probes settle the generation: there are at least `window` of them, each has an
    answer and no hedging word, and every answer is equivalent to the latest one."""
    if window < 1:
        raise ValueError(f"the probe window must be at least 1, got {window}")
    if len(probes) < window:
        return False
    last = probes[-window:]
    if any(p.answer is None or hedges(p.text) for p in last):
        return False
    return all(comparer.equivalent(p.answer, last[-1].answer) for p in last)
