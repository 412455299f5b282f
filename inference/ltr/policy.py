"""The LTR policy: shortest predicted output first, each prompt scored once on arrival, behind the starvation guard.

A scorer turns prompts into scores (higher: shorter expected output). The ranker is scored off the engine step's
critical path: `on_arrival` hands the new prompts to a scoring thread, which takes what has queued up (at most
`batch_size`) as one batch, and `rank` leaves a waiting sequence out of the step until its score is in (it is
admitted a step later instead of the engine waiting for it). Only when no candidate has a score yet, so that
there is nothing else to run, does `rank` wait for the thread. Scorers that cost nothing (a constant; the
benches' oracle, which knows the true lengths) score inline.

The cost is measured: scoring seconds per request (the thread's time, batched) and the time `rank` spent
waiting, which is what the engine actually lost to the ranker.

With a constant scorer every key ties, so the order is arrival order: LTR is then FCFS (with the same guard).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from glassbox.errors import GlassboxError
from glassbox.inference.policy import DEFAULT_PROMOTE_STEPS, DEFAULT_STARVATION_STEPS, Policy
from glassbox.inference.sequence import Sequence


class Scorer(Protocol):
    # True: costs nothing, score inline in on_arrival; False: score on the policy's thread.
    inline: bool

    def score(self, prompts: list[list[int]]) -> list[float]:
        """One score per prompt; higher ranks first (a shorter expected output)."""
        ...


class ConstantScorer:
    inline = True

    def score(self, prompts: list[list[int]]) -> list[float]:
        return [0.0] * len(prompts)


class FunctionScorer:
    """Scores from a function of the prompt (the benches' oracle: minus the true output length)."""

    inline = True

    def __init__(self, fn: Callable[[list[int]], float]):
        self.fn = fn

    def score(self, prompts: list[list[int]]) -> list[float]:
        return [float(self.fn(p)) for p in prompts]


class RankerScorer:
    inline = False

    def __init__(self, ranker: Any, batch_size: int = 32):
        self.ranker = ranker
        self.batch_size = batch_size

    def score(self, prompts: list[list[int]]) -> list[float]:
        return self.ranker.score(prompts, self.batch_size)


class LTRPolicy(Policy):
    name = "ltr"

    def __init__(self, scorer: Scorer, starvation_steps: int | None = DEFAULT_STARVATION_STEPS,
                 promote_steps: int = DEFAULT_PROMOTE_STEPS, batch_size: int = 32):
        super().__init__(starvation_steps, promote_steps)
        self.scorer = scorer
        self.batch_size = batch_size
        self.scores: dict[int, float] = {}
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
        ("constant"), `device`, `batch_size`, and the guard's `starvation_steps` / `promote_steps`."""
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

    def key(self, seq: Sequence) -> tuple:
        return (-self.scores[seq.seq_id],)

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

    def _score(self, seqs: list[Sequence]) -> None:
        """Score a batch, one scorer call for the distinct prompts (a request's n samples share one)."""
        start = time.perf_counter()
        prompts = {tuple(s.prompt_ids): None for s in seqs}
        scores = dict(zip(prompts, self.scorer.score([list(p) for p in prompts])))
        with self._cond:
            for s in seqs:
                self.scores[s.seq_id] = scores[tuple(s.prompt_ids)]
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

