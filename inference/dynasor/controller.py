"""The program controller: runs reasoning programs inside the engine's step and stops them by their certainty.

It is an engine extension (LLMEngine.add_extension). Before each step it starts the programs submitted since the
last one and applies stop requests; after it, it reads its programs' outputs: a self-consistency program's
finished samples give answers, whose certainty may end the program (its unfinished samples stopped) or call for
another round of samples; a chain of thought gets a probe forked off it every `probe_interval` tokens, and stops
once the last probes agree. A program's requests form one scheduler group (admitted and preempted together) and
its outputs are not handed on to the engine's caller: a program answers once, through `on_done`.

Programs are submitted from any thread (`submit`, `stop`, under a lock); everything else runs on the engine's.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

from glassbox.errors import GlassboxError
from glassbox.inference.dynasor.answers import extract_boxed, probe_answer
from glassbox.inference.dynasor.certaindex import ProbeResult, certainty, clusters, majority, probes_agree
from glassbox.inference.dynasor.programs import (ChainOfThought, Program, ProgramError, ProgramLimits,
                                                 ProgramResult, SelfConsistency)
from glassbox.inference.engine import LLMEngine, RequestOutput
from glassbox.inference.sampling_params import MAX_SEED, SamplingParams

OnDone = Callable[[ProgramResult], None]
# Probe i of a seeded chain of thought is seeded seed + PROBE_SEED_STRIDE * (i + 1), clear of the main seed.
PROBE_SEED_STRIDE = 1_000_003


class _Run:
    """One program in flight: its live requests and their tokens so far, and what it has learned."""

    def __init__(self, program_id: str, spec: Program, on_done: OnDone | None, arrival: float):
        self.program_id = program_id
        self.spec = spec
        self.on_done = on_done
        self.arrival = arrival
        self.live: dict[str, int] = {}           # request id -> output tokens so far
        self.spent = 0                           # output tokens of members no longer live
        self.probe_spent = 0

    def tokens(self) -> int:
        return self.spent + sum(self.live.values()) + self.probe_spent

    def rid(self, suffix: str) -> str:
        return f"{self.program_id}/{suffix}"


class _SelfConsistencyRun(_Run):
    spec: SelfConsistency

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.launched = 0
        self.answers: list[str | None] = []
        self.texts: list[str] = []

    def start(self, controller: "ProgramController", engine: LLMEngine) -> None:
        s = self.spec
        self.launch(controller, engine, s.initial_samples if s.adaptive else s.max_samples)

    def launch(self, controller: "ProgramController", engine: LLMEngine, k: int) -> None:
        s = self.spec
        for _ in range(k):
            rid = self.rid(f"s{self.launched}")
            params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                    seed=None if s.seed is None else s.seed + self.launched)
            engine.add_request(rid, s.prompt_ids, params, arrival_time=self.arrival, group=self.program_id)
            controller.owner[rid] = self.program_id
            self.live[rid] = 0
            self.launched += 1

    def on_output(self, controller: "ProgramController", engine: LLMEngine, out: RequestOutput) -> None:
        rid, o = out.request_id, out.outputs[0]
        if not out.finished:
            self.live[rid] = len(o.token_ids)
            return
        self.live.pop(rid, None)
        controller.owner.pop(rid, None)
        self.spent += len(o.token_ids)
        self.answers.append(extract_boxed(o.text))
        self.texts.append(o.text)

    def advance(self, controller: "ProgramController", engine: LLMEngine) -> str | None:
        s = self.spec
        if s.token_budget is not None and self.tokens() >= s.token_budget:
            return "budget"
        if s.adaptive and len(self.answers) >= s.min_answers:
            if certainty(self.answers, s.comparer) >= s.certainty_threshold:
                return "certain"
            if self.decided():
                return "decided"
        more = self.next_round() if s.adaptive else 0
        if more:
            self.launch(controller, engine, more)
        return None if self.live else "completed"

    def decided(self) -> bool:
        """Whether the vote is settled: the leading answer's lead over the runner-up is more than the samples
        still to come (running or not yet started), so waiting for them cannot change the majority."""
        to_come = len(self.live) + self.spec.max_samples - self.launched
        sizes = sorted((len(g) for g in clusters(self.answers, self.spec.comparer)
                        if self.answers[g[0]] is not None), reverse=True) + [0, 0]
        return to_come > 0 and sizes[0] > sizes[1] + to_come

    def next_round(self) -> int:
        """How many samples to start now. Escalating, once `min_answers` have finished without certainty (the
        caller checked it) every remaining sample starts at once, without waiting for the stragglers: a program
        takes at most two rounds, where rounds of `samples_per_round` took up to max_samples / samples_per_round
        serial generations, the latency floor that kept Dynasor from any online SLO. Otherwise a round of
        `samples_per_round` starts when no sample is running."""
        s = self.spec
        left = s.max_samples - self.launched
        if s.escalate and len(self.answers) >= s.min_answers:
            return left
        return 0 if self.live else min(s.samples_per_round, left)

    def result(self, reason: str, now: float, error: str | None) -> ProgramResult:
        s = self.spec
        return ProgramResult(self.program_id, s.kind, majority(self.answers, s.comparer), reason, list(self.answers),
                             list(self.texts), certainty(self.answers, s.comparer), self.launched, 0, self.spent,
                             self.probe_spent, len(s.prompt_ids), self.arrival, now, error)


class _ChainOfThoughtRun(_Run):
    spec: ChainOfThought

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.main = self.rid("main")
        self.main_text = ""
        self.main_answer: str | None = None
        self.main_done = False
        self.cue_ids: list[int] = []
        self.probe: str | None = None            # the probe in flight
        self.num_probes = 0
        self.probes: list[ProbeResult] = []
        self.next_probe_at = self.spec.probe_interval

    def start(self, controller: "ProgramController", engine: LLMEngine) -> None:
        s = self.spec
        self.cue_ids = engine.tokenizer.encode(s.cue)
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed)
        engine.add_request(self.main, s.prompt_ids, params, arrival_time=self.arrival, group=self.program_id)
        controller.owner[self.main] = self.program_id
        self.live[self.main] = 0

    def on_output(self, controller: "ProgramController", engine: LLMEngine, out: RequestOutput) -> None:
        rid, o = out.request_id, out.outputs[0]
        if rid == self.main:
            self.main_text = o.text
            if out.finished:
                self.live.pop(rid, None)
                controller.owner.pop(rid, None)
                self.spent += len(o.token_ids)
                self.main_answer = extract_boxed(o.text)
                self.main_done = True
            else:
                self.live[rid] = len(o.token_ids)
            return
        if rid != self.probe:
            return
        answer = probe_answer(o.text)
        if answer is None and not out.finished:
            return
        if not out.finished:
            engine.abort(rid)                    # the box closed: the rest of the probe's tokens would be waste
        controller.owner.pop(rid, None)
        self.probe = None
        self.probe_spent += len(self.cue_ids) + len(o.token_ids)
        self.probes.append(ProbeResult(answer, o.text))

    def advance(self, controller: "ProgramController", engine: LLMEngine) -> str | None:
        s = self.spec
        if s.token_budget is not None and self.tokens() >= s.token_budget:
            return "budget"
        if s.probes and probes_agree(self.probes, s.probe_window, s.comparer):
            return "probes_agree"
        if self.main_done:
            return "completed"
        generated = self.live.get(self.main, 0)
        if s.probes and self.probe is None and generated >= self.next_probe_at:
            context = len(s.prompt_ids) + generated
            if context + len(self.cue_ids) + s.probe_tokens > engine.max_model_len:
                return None                      # no room left in the context for a probe
            seed = None if s.seed is None else (s.seed + PROBE_SEED_STRIDE * (self.num_probes + 1)) % MAX_SEED
            params = SamplingParams(temperature=s.probe_temperature, top_p=s.probe_top_p,
                                    max_tokens=s.probe_tokens, seed=seed)
            rid = self.rid(f"p{self.num_probes}")
            if engine.fork(self.main, rid, self.cue_ids, params):
                controller.owner[rid] = self.program_id
                self.probe = rid
                self.num_probes += 1
                self.next_probe_at = (generated // s.probe_interval + 1) * s.probe_interval
        return None

    def answer(self) -> str | None:
        if self.spec.probes:
            agreed = probes_agree(self.probes, self.spec.probe_window, self.spec.comparer)
            if agreed:
                return self.probes[-1].answer
        if self.main_done:
            return self.main_answer
        return next((p.answer for p in reversed(self.probes) if p.answer is not None), None)

    def result(self, reason: str, now: float, error: str | None) -> ProgramResult:
        s = self.spec
        agree = float(s.probes and probes_agree(self.probes, s.probe_window, s.comparer))
        return ProgramResult(self.program_id, s.kind, self.answer(), reason, [p.answer for p in self.probes],
                             [self.main_text], agree, 1, self.num_probes, self.spent, self.probe_spent,
                             len(s.prompt_ids), self.arrival, now, error)


RUNS = {SelfConsistency: _SelfConsistencyRun, ChainOfThought: _ChainOfThoughtRun}


class ProgramController:
    """Runs programs on one engine (`attach`). `submit` queues a program, checked at once against `limits` and the
    engine; its result goes to `on_done` when given, else to `results`, when it ends."""

    def __init__(self, engine: LLMEngine, limits: ProgramLimits | None = None):
        self.engine = engine
        self.limits = limits or ProgramLimits()
        self.runs: dict[str, _Run] = {}
        self.owner: dict[str, str] = {}          # request id -> program id
        self.results: dict[str, ProgramResult] = {}
        self._lock = threading.Lock()
        self._inbox: list[_Run] = []
        self._stops: list[str] = []
        self._ids: set[str] = set()
        self.counter = itertools.count()
        engine.add_extension(self)

    @classmethod
    def of(cls, engine: LLMEngine, limits: ProgramLimits | None = None) -> "ProgramController":
        """The engine's controller, attached now if it has none."""
        found = next((e for e in engine.extensions if isinstance(e, cls)), None)
        return found or cls(engine, limits)

    # Any thread ------------------------------------------------------------------------------------------------

    def validate(self, spec: Program) -> None:
        """Raise ProgramError (naming the field) or GlassboxError if the engine cannot run `spec`."""
        if type(spec) not in RUNS:
            raise ProgramError("type", f"must be one of self_consistency, cot; got {type(spec).__name__}")
        spec.validate(self.limits)
        engine = self.engine
        if engine.tokenizer is None:
            raise GlassboxError("reasoning programs read answers from text: the model has no tokenizer.json")
        engine.validate_prompt(spec.prompt_ids, SamplingParams(max_tokens=spec.max_tokens))
        cap = engine.config.max_num_seqs
        together = 1
        if isinstance(spec, SelfConsistency):
            rounds = spec.adaptive and not spec.escalate
            together = max(spec.initial_samples, spec.samples_per_round) if rounds else spec.max_samples
            if together > cap:
                raise ProgramError("max_samples", f"{together} samples would be admitted together, more than the "
                                   f"engine's max_num_seqs = {cap}")
        # A gang that cannot hold all of its KV at once would preempt itself for ever.
        blocks = together * engine.blocks.blocks_needed(len(spec.prompt_ids) + spec.max_tokens)
        if blocks > engine.blocks.num_blocks:
            raise ProgramError("max_samples" if together > 1 else "max_tokens",
                               f"{together} x {len(spec.prompt_ids)} + {spec.max_tokens} tokens would need {blocks} "
                               f"KV blocks together, the engine has {engine.blocks.num_blocks}")

    def submit(self, program_id: str, spec: Program, on_done: OnDone | None = None,
               arrival_time: float | None = None) -> None:
        self.validate(spec)
        if "/" in program_id:
            raise GlassboxError(f"program id {program_id!r}: must not contain '/'")
        run = RUNS[type(spec)](program_id, spec, on_done,
                               time.monotonic() if arrival_time is None else arrival_time)
        with self._lock:
            if program_id in self._ids:
                raise GlassboxError(f"program id {program_id!r} is already in use")
            self._ids.add(program_id)
            self._inbox.append(run)

    def stop(self, program_id: str) -> None:
        """Stop a program at the next step: its requests are aborted (their KV freed) and it answers with what
        it has (finish_reason "stopped")."""
        with self._lock:
            self._stops.append(program_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._stops or self.runs)

    # The engine's thread ---------------------------------------------------------------------------------------

    def before_step(self, engine: LLMEngine) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            stops, self._stops = self._stops, []
        for run in inbox:
            self.runs[run.program_id] = run
            try:
                run.start(self, engine)
            except Exception as e:               # e.g. the engine refused a request: the program fails alone
                self._end(engine, run, "error", f"{type(e).__name__}: {e}")
        for program_id in stops:
            run = self.runs.get(program_id)
            if run is not None:
                self._end(engine, run, "stopped")
        for run in list(self.runs.values()):
            # A member the engine failed outside a step (the server fails requests in flight when a step
            # raises) is gone without an output: its program cannot go on.
            lost = [rid for rid in run.live if rid not in engine.requests]
            if lost:
                self._end(engine, run, "error", f"the engine dropped request {lost[0]}")

    def after_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> list[RequestOutput]:
        passed, touched = [], []
        # Owners first: a program that ends below (one of its requests failed) takes its other outputs with it.
        owners = [self.owner.get(out.request_id) for out in outputs]
        for out, program_id in zip(outputs, owners):
            if program_id is None:
                passed.append(out)
                continue
            run = self.runs.get(program_id)
            if run is None:
                continue
            if out.error is not None:
                self.owner.pop(out.request_id, None)
                run.live.pop(out.request_id, None)
                self._end(engine, run, "error", f"{type(out.error).__name__}: {out.error}")
                continue
            run.on_output(self, engine, out)
            if run not in touched:
                touched.append(run)
        for run in touched:
            if run.program_id not in self.runs:
                continue
            reason = run.advance(self, engine)
            if reason is not None:
                self._end(engine, run, reason)
        return passed

    def _end(self, engine: LLMEngine, run: _Run, reason: str, error: str | None = None) -> None:
        """Abort what the program still runs, counting the tokens those requests got, and deliver its result."""
        for rid in [r for r, pid in self.owner.items() if pid == run.program_id]:
            out = engine.abort(rid)
            self.owner.pop(rid, None)
            tokens = len(out.outputs[0].token_ids) if out is not None else run.live.get(rid, 0)
            if rid in run.live:
                run.live.pop(rid)
                run.spent += tokens
            elif out is not None:                # a probe in flight
                run.probe_spent += len(getattr(run, "cue_ids", [])) + tokens
        self.runs.pop(run.program_id, None)
        result = run.result(reason, time.monotonic(), error)
        with self._lock:
            self._ids.discard(run.program_id)
        if run.on_done is not None:
            run.on_done(result)
        else:
            self.results[run.program_id] = result


def run_programs(engine: LLMEngine, programs: list[Program], limits: ProgramLimits | None = None,
                 prefix: str = "program") -> list[ProgramResult]:
    """Run `programs` on `engine` to the end (offline), beside whatever else it serves; results in order."""
    controller = ProgramController.of(engine, limits)
    ids = [f"{prefix}-{next(controller.counter)}" for _ in programs]
    for program_id, spec in zip(ids, programs):
        controller.submit(program_id, spec)
    while any(program_id not in controller.results for program_id in ids):
        engine.step(unfinished_outputs=False)
    return [controller.results.pop(program_id) for program_id in ids]
