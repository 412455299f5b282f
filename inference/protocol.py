"""The OpenAI request bodies the server accepts, as strict pydantic models (wrong types are 400s, not coerced).

Every value the engine could not compute with is refused here, with an error naming the field: the bounds are
SamplingParams' own (seeds fit a 64-bit generator, top_p is a normal float32, top_k fits int32, penalties stay in
the range where the logits cannot overflow), stop strings are non-empty, no number is NaN or infinite, and every
string encodes to UTF-8 (JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer can encode).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from glassbox.inference.sampling_params import MAX_SEED, MAX_TOP_K, MIN_TOP_P, REPETITION_PENALTY_RANGE


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text ({e.reason} at character {e.start})") from None
    return text


def _normal_float32(top_p: float) -> float:
    if top_p < MIN_TOP_P:
        raise ValueError(f"must be >= {MIN_TOP_P:.3g} (float32's smallest normal number), got {top_p!r}")
    return top_p


Text = Annotated[str, AfterValidator(_utf8)]
StopString = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]


class _Body(BaseModel):
    # Unknown fields (user, ...) are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: Annotated[float, AfterValidator(_normal_float32)] | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    n: int = Field(default=1, ge=1, le=32)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Every generated token is checked against every stop entry: bounded, so one request cannot slow all others.
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)   # with --policy priority: lower runs first
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)


class ContentPart(_Body):
    type: Text
    text: Text | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


_FIELDS = {name for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, ContentPart, StreamOptions)
           for name in model.model_fields}


def error_param(loc: tuple[Any, ...]) -> str | None:
    """The field a validation error's location names, as OpenAI writes it ("messages[0].content"): the location
    up to pydantic's union-branch tags ("str", "list[int]", ...), which are not fields."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
        elif part != "body":
            break
    return out or None
