"""What a caller asks of one generation: decoding rule, length, stops, samples per prompt, logprobs."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from glassbox.errors import GlassboxError

# torch.Generator seeds are 64-bit signed integers; sample i of a request is seeded with seed + i.
MAX_SEED = 2**63 - 1
# top_k becomes a tensor index: a bound that fits int32 keeps any vocabulary while refusing overflowing integers.
MAX_TOP_K = 2**31 - 1
# float32's smallest normal number: the sampler compares top_p in float32, where anything smaller is a subnormal or
# 0, which would drop every token of the row.
MIN_TOP_P = 2.0**-126
# repetition_penalty divides or multiplies logits. Beyond 100x either way the rule is saturated (a penalised logit is
# all but 0, or dominates its row) and further only pushes logits toward float overflow, which breaks the softmax.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


class SamplingParamsError(GlassboxError, ValueError):
    """A sampling value out of range or of the wrong type; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"sampling: {param} {message}")
        self.param = param


def _bounds(lo: float, hi: float | None) -> str:
    return f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"


def _int(name: str, value: Any, lo: int, hi: int | None = None, why: str = "") -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise SamplingParamsError(name, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise SamplingParamsError(name, f"must be {_bounds(lo, hi)}{why}, got {value}")


def _real(name: str, value: Any, lo: float, hi: float | None = None) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise SamplingParamsError(name, f"must be a finite number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise SamplingParamsError(name, f"must be {_bounds(lo, hi)}, got {value}")


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy. top_k 0 or -1 and top_p == 1 disable those filters. `seed` makes a sampled request
    reproducible regardless of what else is in the batch; with n > 1, sample i uses seed + i, so seed + n - 1 must
    be at most 2**63 - 1. `logprobs` asks for the log-probability of each chosen token plus that many top alternatives
    (0 = only the chosen token), taken from the model's raw distribution, before penalties, temperature and filters.

    Penalties change the logits before any decoding rule, greedy included. `presence_penalty` and
    `frequency_penalty` (OpenAI's, each in [-2, 2]) subtract a flat amount from every token already generated and an
    amount per time it was generated; `repetition_penalty` (the CTRL / transformers rule, in [0.01, 100], 1 = off)
    divides the positive logits and multiplies the negative ones of every token in the prompt or the output.

    Every value is checked here, with a `SamplingParamsError` naming the field: a value the sampler cannot compute
    with would otherwise fail in the middle of a batch shared with other requests.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        _int("n", self.n, 1)
        _real("temperature", self.temperature, 0.0)
        _int("top_k", self.top_k, -1, MAX_TOP_K)
        _real("top_p", self.top_p, MIN_TOP_P, 1.0)
        if self.seed is not None:
            why = f" (sample i of n={self.n} is seeded with seed + i, a 64-bit integer)" if self.n > 1 else ""
            _int("seed", self.seed, 0, MAX_SEED - (self.n - 1), why)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop", f"must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not isinstance(t, numbers.Integral) or isinstance(t, bool) for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"must be integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0)
        _real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _real("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
