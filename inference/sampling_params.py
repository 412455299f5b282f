"""What a caller asks of one generation: decoding rule, length, stops, samples per prompt, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from glassbox.errors import GlassboxError


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters. `seed` makes a sampled request
    reproducible regardless of what else is in the batch; with n > 1, sample i uses seed + i. `logprobs` asks for
    the log-probability of each chosen token plus that many top alternatives (0 = only the chosen token), taken
    from the model's raw distribution, before penalties, temperature and filters.

    Penalties change the logits before any decoding rule, greedy included. `presence_penalty` and
    `frequency_penalty` (OpenAI's, each in [-2, 2]) subtract a flat amount from every token already generated and an
    amount per time it was generated; `repetition_penalty` (the CTRL / transformers rule, > 0, 1 = off) divides the
    positive logits and multiplies the negative ones of every token in the prompt or the output.
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
        if self.n < 1:
            raise GlassboxError(f"sampling: n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise GlassboxError(f"sampling: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GlassboxError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GlassboxError(f"sampling: max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise GlassboxError(f"sampling: logprobs must be >= 0, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise GlassboxError("sampling: stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise GlassboxError(f"sampling: {name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise GlassboxError(f"sampling: repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
