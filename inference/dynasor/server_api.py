"""Reasoning programs over HTTP: `/v1/dynasor/chat/completions` and `/v1/dynasor/completions`.

The bodies are OpenAI's chat and completion requests plus one extension field, `program` (its `type`:
"self_consistency" or "cot", and that program's settings), so the real `openai` client calls them with its own
methods: `OpenAI(base_url=".../v1/dynasor").chat.completions.create(..., n=8, extra_body={"program": {...}})`.
`n` is a self-consistency program's sample budget unless `program.max_samples` says otherwise. The response is
OpenAI's, one choice per finished sample (or the chain of thought's text as far as it went), with the program's
outcome under the extension field `dynasor` (answer, finish_reason, certainty, samples, probes, tokens); usage
counts probe tokens as completion tokens. Bad input is a 400 naming the field (`program.type`, `n`, ...); a
client that disconnects stops its program, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glassbox.inference.async_engine import AsyncEngine
from glassbox.inference.dynasor.controller import ProgramController
from glassbox.inference.dynasor.programs import (PROGRAM_TYPES, ChainOfThought, ProgramError, ProgramLimits,
                                                 ProgramResult, SelfConsistency)
from glassbox.inference.protocol import ChatCompletionRequest, CompletionRequest
from glassbox.inference.server import DISCONNECT_POLL_S, APIError

# Sampling defaults where the request leaves them out: self-consistency needs diverse samples, a chain of thought
# is greedy unless asked otherwise.
DEFAULT_TEMPERATURE = {"self_consistency": 0.7, "cot": 0.0}
DEFAULT_MAX_TOKENS = 512


class ProgramOptions(BaseModel):
    """The `program` extension field. Unknown keys are refused (a misspelt threshold should not pass silently)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    type: str
    max_samples: int | None = None
    adaptive: bool = True
    initial_samples: int = 2
    samples_per_round: int = 2
    escalate: bool = True
    min_answers: int = 2
    certainty_threshold: float = 1.0
    probes: bool = True
    probe_interval: int = 32
    probe_tokens: int = 20
    probe_window: int = 2
    probe_temperature: float = 0.6
    probe_top_p: float = 0.95
    cue: str | None = None
    token_budget: int | None = Field(default=None, ge=1)


class ProgramChatRequest(ChatCompletionRequest):
    program: dict[str, Any] | None = None


class ProgramCompletionRequest(CompletionRequest):
    program: dict[str, Any] | None = None


def parse_options(raw: dict[str, Any] | None) -> ProgramOptions:
    """The `program` field, checked here so that an error names its key ("program.probe_window")."""
    if raw is None:
        raise APIError(400, "program: required (an object with the program's type: "
                       f"{', '.join(PROGRAM_TYPES)})", param="program")
    try:
        return ProgramOptions.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(["program", *(str(part) for part in err.get("loc", ()))])
        raise APIError(400, f"{param}: {err.get('msg')}", param=param) from None


def build_program(options: ProgramOptions, prompt_ids: list[int], n: int, max_tokens: int,
                  temperature: float | None, top_p: float | None, seed: int | None):
    if options.type not in PROGRAM_TYPES:
        raise APIError(400, f"program.type: unknown program type {options.type!r} (known: "
                       f"{', '.join(PROGRAM_TYPES)})", param="program.type")
    common = dict(prompt_ids=prompt_ids, max_tokens=max_tokens, seed=seed,
                  temperature=DEFAULT_TEMPERATURE[options.type] if temperature is None else temperature,
                  top_p=1.0 if top_p is None else top_p, token_budget=options.token_budget)
    if options.type == "self_consistency":
        return SelfConsistency(**common, max_samples=options.max_samples or n, adaptive=options.adaptive,
                               initial_samples=options.initial_samples, samples_per_round=options.samples_per_round,
                               escalate=options.escalate, min_answers=options.min_answers,
                               certainty_threshold=options.certainty_threshold)
    cot = dict(probes=options.probes, probe_interval=options.probe_interval, probe_tokens=options.probe_tokens,
               probe_window=options.probe_window, probe_temperature=options.probe_temperature,
               probe_top_p=options.probe_top_p)
    if options.cue is not None:
        cot["cue"] = options.cue
    return ChainOfThought(**common, **cot)


def program_body(result: ProgramResult) -> dict[str, Any]:
    return {"program": result.kind, "answer": result.answer, "finish_reason": result.finish_reason,
            "certainty": result.certainty, "answers": result.answers, "num_samples": result.num_samples,
            "num_probes": result.num_probes, "output_tokens": result.output_tokens,
            "probe_tokens": result.probe_tokens, "latency_s": result.latency}


def usage(result: ProgramResult) -> dict[str, int]:
    completion = result.total_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def mount_dynasor(app: FastAPI, engine: AsyncEngine, check_key: Callable, check_model: Callable[[str], None],
                  limits: ProgramLimits | None = None) -> ProgramController:
    """Add the program endpoints to `app` and a program controller to its engine (before the engine starts)."""
    llm = engine.engine
    controller = ProgramController.of(llm, limits or ProgramLimits(max_samples=min(llm.config.max_n, 32)))
    tokenizer = llm.tokenizer

    async def run(spec, request: Request, n_given: bool) -> ProgramResult:
        if engine.health()["status"] == "dead":
            raise APIError(503, "the engine is not running: the program cannot be served", "server_error",
                           code="engine_dead")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def deliver(result: ProgramResult) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        program_id = f"dyn-{uuid.uuid4().hex}"
        try:
            controller.submit(program_id, spec, on_done=deliver)
        except ProgramError as e:
            param = "n" if e.param == "max_samples" and not n_given else f"program.{e.param}"
            raise APIError(400, str(e), param=param) from None
        engine.notify()
        while True:
            try:
                result = await asyncio.wait_for(asyncio.shield(done), DISCONNECT_POLL_S)
                break
            except TimeoutError:
                if await request.is_disconnected():
                    controller.stop(program_id)
                    engine.notify()
                    raise APIError(499, "the client closed the connection", "client_closed_request") from None
        if result.finish_reason == "error":
            raise APIError(500, f"the program failed: {result.error}", "server_error")
        return result

    def check(req: ChatCompletionRequest | CompletionRequest) -> None:
        check_model(req.model)
        if req.stream:
            raise APIError(400, "stream: reasoning programs answer once; streaming is not supported",
                           param="stream")
        if tokenizer is None:
            raise APIError(400, "reasoning programs read answers from text: the model has no tokenizer.json")

    @app.post("/v1/dynasor/chat/completions", dependencies=[Depends(check_key)])
    async def program_chat(req: ProgramChatRequest, request: Request) -> dict[str, Any]:
        check(req)
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        prompt = (await asyncio.to_thread(tokenizer.encode_batch, [text]))[0]
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        options = parse_options(req.program)
        spec = build_program(options, prompt, req.n, max_tokens, req.temperature, req.top_p, req.seed)
        result = await run(spec, request, options.max_samples is not None)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                    "logprobs": None} for i, text in enumerate(result.texts)]
        return {"id": f"chatcmpl-{result.program_id}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(result), "dynasor": program_body(result)}

    @app.post("/v1/dynasor/completions", dependencies=[Depends(check_key)])
    async def program_completion(req: ProgramCompletionRequest, request: Request) -> dict[str, Any]:
        check(req)
        if isinstance(req.prompt, str):
            prompt = (await asyncio.to_thread(tokenizer.encode_batch, [req.prompt]))[0]
        elif req.prompt and all(isinstance(t, int) for t in req.prompt):
            prompt = list(req.prompt)
        else:
            raise APIError(400, "prompt: a program answers one prompt (a string or a list of token ids)",
                           param="prompt")
        options = parse_options(req.program)
        spec = build_program(options, prompt, req.n, req.max_tokens or DEFAULT_MAX_TOKENS, req.temperature,
                             req.top_p, req.seed)
        result = await run(spec, request, options.max_samples is not None)
        choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None}
                   for i, text in enumerate(result.texts)]
        return {"id": f"cmpl-{result.program_id}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(result), "dynasor": program_body(result)}

    return controller
