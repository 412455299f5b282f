"""What a reasoning program is: its kind, its question, its budgets, and how certainty may cut it short.

Two kinds. `SelfConsistency` samples answers to one question and takes the majority; adaptive, it starts with a
few samples, stops once their answers' certainty passes a threshold, and adds samples in rounds while it does not
(plain self-consistency is the same program with `adaptive=False`: all samples, then the vote).
`ChainOfThought` is one long generation; with probes, every `probe_interval` tokens the engine forks a short probe
that is asked for its answer now, and the generation stops once the last `probe_window` probes agree.

Budgets are per program: the most samples (or the one generation), the most tokens per generation, and optionally
the most tokens in all, after which the program stops with the answer it has. `ProgramLimits` bounds what a
client may ask for; `validate` names the field that breaks a rule.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Union

from glassbox.errors import GlassboxError
from glassbox.inference.dynasor.answers import ANSWER_CUE, Comparer, MathComparer


class ProgramError(GlassboxError, ValueError):
    """A program's settings are out of range or of the wrong type; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"program: {param} {message}")
        self.param = param


def _int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ProgramError(name, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ProgramError(name, f"must be in [{lo}, {hi}], got {value}" if hi is not None
                           else f"must be >= {lo}, got {value}")


def _real(name: str, value: object, lo: float, hi: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProgramError(name, f"must be a number in [{lo}, {hi}], got {value!r}")


@dataclass
class ProgramLimits:
    """The most a client may ask of one program (the server's and LLM's bounds): samples, and tokens per
    generation (None: up to the model's context)."""

    max_samples: int = 32
    max_tokens: int | None = None


@dataclass
class SelfConsistency:
    """Up to `max_samples` answers to `prompt_ids`, the majority answer wins.

    Adaptive: `initial_samples` first; the program stops (unfinished samples stopped) once at least `min_answers`
    samples have finished and the certainty of their answers (Certaindex: 1 - H / log n) is at least
    `certainty_threshold`, or once the majority is decided (its lead over the runner-up exceeds the samples still
    to come). While uncertain, `escalate` starts every remaining sample at once as soon as `min_answers` have
    finished (at most two rounds, for latency); without it, `samples_per_round` more start each time all running
    samples are done. Not adaptive: all `max_samples` at once, run to the end. `token_budget` caps the tokens of
    all samples together."""

    prompt_ids: list[int]
    max_samples: int = 8
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    adaptive: bool = True
    initial_samples: int = 2
    samples_per_round: int = 2
    escalate: bool = True
    min_answers: int = 2
    certainty_threshold: float = 1.0
    token_budget: int | None = None
    comparer: Comparer = field(default_factory=MathComparer)

    kind = "self_consistency"

    def validate(self, limits: ProgramLimits) -> None:
        _prompt(self.prompt_ids)
        _int("max_samples", self.max_samples, 1, limits.max_samples)
        _tokens(self.max_tokens, limits)
        _real("temperature", self.temperature, 0.0, 2.0)
        _real("top_p", self.top_p, 2.0**-126, 1.0)
        if self.seed is not None:
            _int("seed", self.seed, 0, 2**62)
        if not isinstance(self.adaptive, bool):
            raise ProgramError("adaptive", f"must be true or false, got {self.adaptive!r}")
        _int("initial_samples", self.initial_samples, 1, self.max_samples)
        _int("samples_per_round", self.samples_per_round, 1, self.max_samples)
        if not isinstance(self.escalate, bool):
            raise ProgramError("escalate", f"must be true or false, got {self.escalate!r}")
        _int("min_answers", self.min_answers, 1, self.max_samples)
        _real("certainty_threshold", self.certainty_threshold, 0.0, 1.0)
        if self.token_budget is not None:
            _int("token_budget", self.token_budget, 1)


@dataclass
class ChainOfThought:
    """One generation of up to `max_tokens` tokens answering `prompt_ids`.

    With `probes`, every `probe_interval` generated tokens a probe forks off it (sharing its KV), appends `cue`
    and decodes up to `probe_tokens` tokens at `probe_temperature` / `probe_top_p`; once the last `probe_window`
    probes give equivalent answers with no hedging word, the generation stops and that answer is the program's.
    Without, the answer is the generation's own final box. `token_budget` caps generation and probe tokens."""

    prompt_ids: list[int]
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    probes: bool = True
    probe_interval: int = 32
    probe_tokens: int = 20
    probe_window: int = 2
    probe_temperature: float = 0.6
    probe_top_p: float = 0.95
    cue: str = ANSWER_CUE
    token_budget: int | None = None
    comparer: Comparer = field(default_factory=MathComparer)

    kind = "cot"

    def validate(self, limits: ProgramLimits) -> None:
        _prompt(self.prompt_ids)
        _tokens(self.max_tokens, limits)
        _real("temperature", self.temperature, 0.0, 2.0)
        _real("top_p", self.top_p, 2.0**-126, 1.0)
        if self.seed is not None:
            _int("seed", self.seed, 0, 2**62)
        if not isinstance(self.probes, bool):
            raise ProgramError("probes", f"must be true or false, got {self.probes!r}")
        _int("probe_interval", self.probe_interval, 1)
        _int("probe_tokens", self.probe_tokens, 1, 256)
        _int("probe_window", self.probe_window, 1, 16)
        _real("probe_temperature", self.probe_temperature, 0.0, 2.0)
        _real("probe_top_p", self.probe_top_p, 2.0**-126, 1.0)
        if not isinstance(self.cue, str) or not self.cue:
            raise ProgramError("cue", f"must be a non-empty string, got {self.cue!r}")
        if self.token_budget is not None:
            _int("token_budget", self.token_budget, 1)


Program = Union[SelfConsistency, ChainOfThought]
PROGRAM_TYPES: dict[str, type] = {"self_consistency": SelfConsistency, "cot": ChainOfThought}


def _prompt(prompt_ids: object) -> None:
    if not isinstance(prompt_ids, list) or not prompt_ids:
        raise ProgramError("prompt", "must be a non-empty list of token ids")


def _tokens(max_tokens: object, limits: ProgramLimits) -> None:
    _int("max_tokens", max_tokens, 1, limits.max_tokens)


@dataclass
class ProgramResult:
    """How a program ended. `answer` is its answer (the majority, the agreeing probes', or the generation's own),
    None if it has none. `finish_reason`: "certain" (self-consistency stopped by its certainty), "decided" (by a
    majority the samples still to come could not overturn), "probes_agree", "completed" (ran to the end of its
    samples or generation), "budget" (its token budget ran out), "stopped" (a caller stopped it), "error" (the
    engine failed one of its requests: `error` says why).

    Tokens: `output_tokens` generated by its samples or generation (stopped ones counted as far as they got),
    `probe_tokens` computed by its probes (cue and decoded tokens: the shared context is not recomputed),
    `total_tokens` both."""

    program_id: str
    kind: str
    answer: str | None
    finish_reason: str
    answers: list[str | None]
    texts: list[str]
    certainty: float
    num_samples: int
    num_probes: int
    output_tokens: int
    probe_tokens: int
    prompt_tokens: int
    arrival_time: float
    finish_time: float
    error: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.output_tokens + self.probe_tokens

    @property
    def latency(self) -> float:
        return self.finish_time - self.arrival_time
