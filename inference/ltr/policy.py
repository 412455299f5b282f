"""The LTR policy: shortest predicted output first, each prompt scored once on arrival, behind the starvation guard.

A scorer turns prompts into scores (higher: shorter expected output). The ranker is scored off the engine step's
critical path: `on_arrival` hands the new prompts to a scoring thread, which takes what has queued up (at most
`batch_size`) as one batch, and `rank` leaves a waiting sequence out of the step until its score is in (it is
admitted a step later instead of the engine waiting for it). Only when no candidate has a score yet, so that
there is nothing else to run, does `rank` wait for the thread. Scorers that cost nothing (a constant; the
benches' oracle, which knows the true lengths) score inline.

The cost is measured: scoring seconds per request (the thread's time, batched) and the time `rank` spent
waiting, which is what the engine actually lost to the ranker.

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

import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from glassbox.errors import GlassboxError
from glassbox.inference.policy import DEFAULT_PROMOTE_STEPS, Policy
from glassbox.inference.sequence import Sequence

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
    # True: costs nothing, score inline in on_arrival; False: score on the policy's thread.
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
        self._queue: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self.num_scored = 0
        self.score_seconds = 0.0
        self.wait_seconds = 0.0
        self._thread: threading.Thread | None = None
        if not scorer.inline:
            self._thread = threading.Thread(target=self._work, name="glassbox-ltr-scorer", daemon=True)
            self._thread.start()

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
        return cls(RankerScorer(Ranker.load(ranker_dir, device, tokenizer), batch_size), batch_size=batch_size,
                   **options)

    def remaining(self, seq: Sequence) -> float | None:
        """Predicted output tokens still to come (negative once a request outlives its prediction), or None."""
        length = self.lengths.get(seq.seq_id)
        return None if length is None else length - seq.num_output_tokens

    def key(self, seq: Sequence) -> tuple:
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
            return
        with self._cond:
            self._queue.extend(seqs)
            self._cond.notify_all()

    def rank(self, candidates: list[Sequence]) -> list[Sequence]:
        if self._error is not None:
            raise GlassboxError(f"ltr scorer failed: {self._error}") from self._error
        ready = [s for s in candidates if s.seq_id in self.scores]
        if not ready and candidates:
            start = time.perf_counter()
            with self._cond:
                self._cond.wait_for(lambda: any(s.seq_id in self.scores for s in candidates) or self._error)
            self.wait_seconds += time.perf_counter() - start
            return self.rank(candidates)
        return super().rank(ready)

    def on_finish(self, seq: Sequence) -> None:
        super().on_finish(seq)
        with self._cond:
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
        with self._cond:
            for s in seqs:
                p = tuple(s.prompt_ids)
                if p in lengths:
                    self.lengths[s.seq_id] = lengths[p]
                self.scores[s.seq_id] = scores[p]
            self.num_scored += len(seqs)
            self.score_seconds += time.perf_counter() - start
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                # At most one scorer batch at a time, so the first scores of a burst are out (and those requests
                # admissible) while the rest are still being scored.
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            try:
                self._score(batch)
            except BaseException as e:     # surfaced by the next rank(), on the engine's thread
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return

    def stats(self) -> dict[str, float]:
        n = max(self.num_scored, 1)
        return {**super().stats(), "ltr_scored": self.num_scored,
                "ltr_score_ms_per_request": 1000 * self.score_seconds / n,
                "ltr_wait_ms_total": 1000 * self.wait_seconds}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

