"""The LTR policy: shortest predicted output first, each prompt scored once on arrival, behind the starvation guard.

A scorer turns prompts into scores (higher: shorter expected output). A ranker is scored only when its order
decides something, and then in one batch: at a step where more requests wait than there are free sequence
slots, or where a request is still waiting from an earlier step (the KV pool held it back), every candidate
without a score is scored together (in batches of `batch_size`) before ranking. Below that load every waiting
request is admitted anyway, so nothing is scored and nothing waits for a score: the engine then runs exactly as
FCFS. Scorers that cost nothing (a constant; the benches' oracle, which knows the true lengths) score on arrival.
(A scoring thread was tried first: on the H200 its ranker forwards, each op waiting for the GIL that the engine's
step loop holds, kept requests out of the step for 0.27 s at low load, where a batch costs 3 ms inline.)

The cost is measured: scoring seconds per request (batched), all of it time the engine step waited.

What is ranked is the predicted *remaining* output (the predicted length less the tokens already generated),
where the scorer predicts lengths (a ranker calibrated at training, the benches' oracle): a request near its end
ranks above a fresh one of the same predicted length, and a running request only rises in rank as it decodes, so
no two requests trade places back and forth. A scorer without lengths ranks by its score alone.

Preemption (the `preemption` option) is where a ranking can lose what it wins. Recompute preemption costs the
victim its KV (its full blocks usually come back as prefix-cache hits, the rest is prefilled again), and every
re-admission is a prefill step, which on the GPU runs eagerly instead of replaying a decode CUDA graph; what SJF
actually wins is the order in which a queue is served at overload. So by default (`remaining`) a waiting request
preempts a running one only when the victim's predicted remaining output is at least `preempt_ratio` times the
candidate's predicted output and the victim has been preempted fewer than `max_preemptions` times: a short
request still overtakes a long one already running, but no request is preempted for a near tie, near its end, or
over and over. `never` is non-preemptive ranked admission (the queue is served shortest first, running requests
finish); `always` lets the ranking alone decide, as FCFS and priority do. Without predicted lengths, `remaining`
falls back to `always`.

With a constant scorer every key ties, so the order is arrival order: LTR is then FCFS (with the same guard).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Protocol

import torch

from glassbox.errors import GlassboxError
from glassbox.inference.policy import DEFAULT_PROMOTE_STEPS, Policy, SchedulerState
from glassbox.inference.sequence import Sequence, Status

# A waiting request preempts a running one only if the victim has at least twice its predicted output left, and
# a request is preempted by rank at most once: the victim loses a prefill step and its partial block either way.
DEFAULT_PREEMPT_RATIO = 2.0
DEFAULT_MAX_PREEMPTIONS = 1
# The guard's threshold for LTR, in steps a request is passed over. It must be well above the queueing a
# shortest-first order is meant to cause, or the guard promotes most of an overloaded queue back into arrival
# order: in the scheduler-only replay (`python bench/ltr_scheduling.py replay`: cap 8, 96 requests at 2x load),
# 200 steps promoted most of the requests and left oracle SJF no better than FCFS; 1000 promoted few.
LTR_STARVATION_STEPS = 1000


PREEMPTION_MODES = ("remaining", "never", "always")


class Scorer(Protocol):
    # True: costs nothing, score every request on arrival; False: score in batches, only where the order matters.
    inline: bool

    def score(self, prompts: list[list[int]]) -> list[float]:
        """One score per prompt; higher ranks first (a shorter expected output)."""
        ...

    def lengths(self, scores: list[float]) -> list[float] | None:
        """The predicted output length (tokens) behind each score, or None where the scorer has no lengths."""
        ...


class ConstantScorer:
    inline = True

    def score(self, prompts: list[list[int]]) -> list[float]:
        return [0.0] * len(prompts)

    def lengths(self, scores: list[float]) -> None:
        return None


class FunctionScorer:
    """Scores from a function of the prompt, without lengths (tests: any order one wants)."""

    inline = True

    def __init__(self, fn: Callable[[list[int]], float]):
        self.fn = fn

    def score(self, prompts: list[list[int]]) -> list[float]:
        return [float(self.fn(p)) for p in prompts]

    def lengths(self, scores: list[float]) -> None:
        return None


class LengthScorer:
    """Predicted output lengths from a function of the prompt, scored as minus the length (the benches' oracle:
    the true lengths)."""

    inline = True

    def __init__(self, fn: Callable[[list[int]], float]):
        self.fn = fn

    def score(self, prompts: list[list[int]]) -> list[float]:
        return [-float(self.fn(p)) for p in prompts]

    def lengths(self, scores: list[float]) -> list[float]:
        return [-s for s in scores]


class RankerScorer:
    inline = False

    def __init__(self, ranker: Any, batch_size: int = 32):
        self.ranker = ranker
        self.batch_size = batch_size

    def score(self, prompts: list[list[int]]) -> list[float]:
        return self.ranker.score(prompts, self.batch_size)

    def lengths(self, scores: list[float]) -> list[float] | None:
        return self.ranker.predicted_lengths(scores)


class LTRPolicy(Policy):
    name = "ltr"

    def __init__(self, scorer: Scorer, starvation_steps: int | None = LTR_STARVATION_STEPS,
                 promote_steps: int = DEFAULT_PROMOTE_STEPS, batch_size: int = 32, preemption: str = "remaining",
                 preempt_ratio: float = DEFAULT_PREEMPT_RATIO, max_preemptions: int = DEFAULT_MAX_PREEMPTIONS):
        super().__init__(starvation_steps, promote_steps)
        if preemption not in PREEMPTION_MODES:
            raise GlassboxError(f"policy 'ltr' option preemption: {preemption!r} is not one of "
                                f"{', '.join(PREEMPTION_MODES)}")
        if isinstance(preempt_ratio, bool) or not isinstance(preempt_ratio, (int, float)) or preempt_ratio < 1:
            raise GlassboxError(f"policy 'ltr' option preempt_ratio: must be a number >= 1, got {preempt_ratio!r}")
        if isinstance(max_preemptions, bool) or not isinstance(max_preemptions, int) or max_preemptions < 0:
            raise GlassboxError(f"policy 'ltr' option max_preemptions: must be an integer >= 0, got "
                                f"{max_preemptions!r}")
        self.scorer = scorer
        self.batch_size = batch_size
        self.preemption = preemption
        self.preempt_ratio = float(preempt_ratio)
        self.max_preemptions = max_preemptions
        self.scores: dict[int, float] = {}
        # seq_id -> predicted output length, for a scorer that predicts lengths.
        self.lengths: dict[int, float] = {}
        # Waiting requests the last step left waiting: the order among them decides who goes next.
        self._passed_over: set[int] = set()
        self.num_scored = 0
        self.score_seconds = 0.0

    @classmethod
    def build(cls, options: dict, tokenizer: Any = None) -> "LTRPolicy":
        """Options: `ranker` (a ranker directory; its tokenizer must be the served model's) or `scorer`
        ("constant"), `device`, `batch_size`, `preemption` / `preempt_ratio` / `max_preemptions`, and the
        guard's `starvation_steps` / `promote_steps`."""
        options = dict(options)
        ranker_dir = options.pop("ranker", None)
        scorer_name = options.pop("scorer", None)
        device = options.pop("device", "cpu")
        batch_size = options.pop("batch_size", 32)
        if (ranker_dir is None) == (scorer_name is None):
            raise GlassboxError("policy 'ltr': give exactly one of the options ranker (a directory `glassbox ltr "
                                "train` wrote) or scorer ('constant')")
        if scorer_name is not None:
            if scorer_name != "constant":
                raise GlassboxError(f"policy 'ltr': unknown scorer {scorer_name!r} (known: constant)")
            return cls(ConstantScorer(), **options)
        from glassbox.inference.ltr.ranker import Ranker

        if tokenizer is None:
            raise GlassboxError(f"policy 'ltr': ranker {ranker_dir}: the served model has no tokenizer.json, so the "
                                "ranker's tokenizer cannot be checked against it")
        ranker = Ranker.load(ranker_dir, device, tokenizer)
        if torch.device(device).type == "cuda":
            ranker.warm_up(batch_size)       # first-use costs at start-up, not on requests (Ranker.warm_up)
        return cls(RankerScorer(ranker, batch_size), batch_size=batch_size, **options)

    def remaining(self, seq: Sequence) -> float | None:
        """Predicted output tokens still to come (negative once a request outlives its prediction), or None."""
        length = self.lengths.get(seq.seq_id)
        return None if length is None else length - seq.num_output_tokens

    def key(self, seq: Sequence) -> tuple:
        if seq.seq_id not in self.scores:      # not scored (nothing contended): after the scored, by arrival
            return (math.inf, 0.0)
        left = self.remaining(seq)
        return (0.0 if left is None else left, -self.scores[seq.seq_id])

    def may_preempt(self, victim: Sequence, candidate: Sequence) -> bool:
        if self.preemption == "never" or not super().may_preempt(victim, candidate):
            return False
        left, wanted = self.remaining(victim), self.remaining(candidate)
        if self.preemption == "always" or left is None or wanted is None:
            return True
        return victim.num_preemptions < self.max_preemptions and left >= self.preempt_ratio * max(wanted, 1.0)

    def on_arrival(self, seqs: list[Sequence]) -> None:
        if self.scorer.inline:
            self._score(seqs)

    def rank(self, candidates: list[Sequence]) -> list[Sequence]:
        unscored = [s for s in candidates if s.seq_id not in self.scores]
        if unscored and self._contended(candidates):
            for at in range(0, len(unscored), self.batch_size):
                self._score(unscored[at:at + self.batch_size])
        return super().rank(candidates)

    def _contended(self, candidates: list[Sequence]) -> bool:
        """Whether this step's order decides anything: more requests wait than there are free sequence slots, or
        a request waits from an earlier step. Without the scheduler's slot count, always."""
        waiting = [s for s in candidates if s.status is Status.WAITING]
        if not waiting:
            return False
        if self.max_num_seqs is None:
            return True
        free = self.max_num_seqs - (len(candidates) - len(waiting))
        return len(waiting) > free or any(s.seq_id in self._passed_over for s in waiting)

    def on_step(self, state: SchedulerState) -> None:
        super().on_step(state)
        self._passed_over = {s.seq_id for s in state.candidates
                             if s.status is Status.WAITING and s.seq_id not in state.scheduled}

    def on_finish(self, seq: Sequence) -> None:
        super().on_finish(seq)
        self.scores.pop(seq.seq_id, None)
        self.lengths.pop(seq.seq_id, None)

    def _score(self, seqs: list[Sequence]) -> None:
        """Score a batch, one scorer call for the distinct prompts (a request's n samples share one)."""
        start = time.perf_counter()
        prompts = {tuple(s.prompt_ids): None for s in seqs}
        values = self.scorer.score([list(p) for p in prompts])
        scores = dict(zip(prompts, values))
        predicted = self.scorer.lengths(values)
        lengths = dict(zip(prompts, predicted)) if predicted is not None else {}
        for s in seqs:
            p = tuple(s.prompt_ids)
            if p in lengths:
                self.lengths[s.seq_id] = lengths[p]
            self.scores[s.seq_id] = scores[p]
        self.num_scored += len(seqs)
        self.score_seconds += time.perf_counter() - start

    def stats(self) -> dict[str, float]:
        n = max(self.num_scored, 1)
        return {**super().stats(), "ltr_scored": self.num_scored,
                "ltr_score_ms_per_request": 1000 * self.score_seconds / n,
                "ltr_score_ms_total": 1000 * self.score_seconds}
