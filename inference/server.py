"""`glassbox serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine.

Endpoints: /v1/completions, /v1/chat/completions (both with SSE streaming), /v1/models, /health, /metrics.
Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, with 4xx codes for bad input. A
client that disconnects, streaming or not, has its request aborted, which frees its KV blocks at the next engine
step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from glassbox.errors import GlassboxError
from glassbox.inference.async_engine import AsyncEngine
from glassbox.inference.engine import EngineConfig, LLMEngine, RequestOutput
from glassbox.inference.protocol import ChatCompletionRequest, CompletionRequest
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.sequence import TokenLogprob


# How often, at least, a non-streaming request checks that its client is still connected while it waits.
DISCONNECT_POLL_S = 0.1


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('msg')}", None
    param = ".".join(loc) or None
    return (f"{param}: {err.get('msg')}" if param else str(err.get("msg"))), param


class _Choice:
    """What has been sent of one choice of a streamed response."""

    def __init__(self) -> None:
        self.text_sent = 0
        self.tokens_sent = 0
        self.started = False
        self.finished = False


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    llm = engine.engine
    tokenizer = llm.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="glassbox", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(GlassboxError)
    async def _glassbox_error(_: Request, exc: GlassboxError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    async def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {model_name!r})",
                           param="model", code="model_not_found")

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise APIError(400, "this model directory has no tokenizer.json: send prompts as token ids")

    def sampling(req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                 logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=req.seed,
            max_tokens=max_tokens,
            stop=req.stop or [],
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
        )

    def submit(prompts: list[list[int]], params: list[SamplingParams], prefix: str) -> tuple[list[str], asyncio.Queue]:
        for prompt, p in zip(prompts, params):
            llm.validate_prompt(prompt, p)
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{prefix}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params):
            engine.submit(rid, prompt, p, queue)
        return ids, queue

    def token_text(token_id: int) -> str:
        return tokenizer.token_text(token_id) if tokenizer is not None else str(token_id)

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def usage(prompts: list[list[int]], finals: dict[str, RequestOutput]) -> dict[str, int]:
        completion = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        prompt = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(ids: list[str], queue: asyncio.Queue, request: Request) -> dict[str, RequestOutput]:
        """Wait for the requests' final outputs. A non-streaming response has nothing to write until the end, so
        the client's disconnect is polled between outputs; a client gone means the requests are aborted."""
        finals: dict[str, RequestOutput] = {}
        try:
            while len(finals) < len(ids):
                if queue.empty():
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the connection", "client_closed_request")
                    try:
                        item = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        continue
                else:
                    item = queue.get_nowait()
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {item}", "server_error")
                if item.finished:
                    finals[item.request_id] = item
        finally:
            for rid in ids:
                if rid not in finals:
                    engine.abort(rid)
        return finals

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(ids: list[str], queue: asyncio.Queue, n: int, chat: bool, prompts: list[list[int]],
                     base: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
        index_of = {rid: i for i, rid in enumerate(ids)}
        choices: dict[int, _Choice] = {}
        finals: dict[str, RequestOutput] = {}
        try:
            while len(finals) < len(ids):
                item = await queue.get()
                if isinstance(item, Exception):
                    yield sse(APIError(500, f"generation failed: {item}", "server_error").body())
                    return
                if item.finished:
                    finals[item.request_id] = item
                for o in item.outputs:
                    idx = index_of[item.request_id] * n + o.index
                    state = choices.setdefault(idx, _Choice())
                    delta_text = o.text[state.text_sent:]
                    new_lps = o.logprobs[state.tokens_sent:] if o.logprobs is not None else None
                    if state.finished or (not delta_text and o.finish_reason is None and state.started):
                        continue
                    choice: dict[str, Any] = {"index": idx, "finish_reason": o.finish_reason}
                    if chat:
                        delta: dict[str, Any] = {"content": delta_text} if delta_text or not state.started else {}
                        if not state.started:
                            delta["role"] = "assistant"
                        choice["delta"] = delta
                        choice["logprobs"] = chat_logprobs(new_lps) if new_lps is not None else None
                    else:
                        choice["text"] = delta_text
                        choice["logprobs"] = (completion_logprobs(new_lps, state.text_sent)
                                              if new_lps is not None else None)
                    state.started = True
                    state.finished = o.finish_reason is not None
                    state.text_sent = len(o.text)
                    state.tokens_sent = len(o.token_ids)
                    yield sse({**base, "choices": [choice]})
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(prompts, finals)})
            yield "data: [DONE]\n\n"
        finally:
            for rid in ids:
                if rid not in finals:
                    engine.abort(rid)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "glassbox", "max_model_len": llm.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported: ask for n samples and rank them yourself",
                           param="best_of")
        raw = req.prompt
        if isinstance(raw, str):
            need_tokenizer()
            prompts = [tokenizer.encode(raw)]
        elif not raw:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        elif isinstance(raw[0], str):
            need_tokenizer()
            prompts = [tokenizer.encode(p) for p in raw]
        elif isinstance(raw[0], int):
            prompts = [list(raw)]
        else:
            prompts = [list(p) for p in raw]
        if any(not p for p in prompts):
            raise APIError(400, "prompt: must not be empty", param="prompt")
        params = [sampling(req, req.max_tokens or 16, req.logprobs)] * len(prompts)
        cid = f"cmpl-{uuid.uuid4().hex}"
        ids, queue = submit(prompts, params, cid)
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(ids, queue, req.n, False, prompts, base, include_usage),
                                     media_type="text/event-stream")
        finals = await collect(ids, queue, request)
        choices = []
        for i, rid in enumerate(ids):
            for o in finals[rid].outputs:
                choices.append({"index": i * req.n + o.index, "text": o.text, "finish_reason": o.finish_reason,
                                "logprobs": completion_logprobs(o.logprobs, 0) if o.logprobs is not None else None})
        return {**base, "choices": choices, "usage": usage(prompts, finals)}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        need_tokenizer()
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        prompt = tokenizer.encode(text)
        if not prompt:
            raise APIError(400, "messages: the rendered chat prompt is empty", param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, llm.max_model_len - len(prompt))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        ids, queue = submit([prompt], [sampling(req, max_tokens, logprobs)], cid)
        base = {"id": cid, "object": "chat.completion.chunk" if req.stream else "chat.completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(ids, queue, req.n, True, [prompt], base, include_usage),
                                     media_type="text/event-stream")
        finals = await collect(ids, queue, request)
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason,
                    "logprobs": chat_logprobs(o.logprobs) if o.logprobs is not None else None}
                   for o in finals[ids[0]].outputs]
        return {**base, "choices": choices, "usage": usage([prompt], finals)}

    return app


@contextmanager
def running_server(engine: LLMEngine, model_name: str, api_key: str | None = None,
                   host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `engine` from a background thread for the duration of a `with` block; yields the base URL.

    Port 0 picks a free port. Used by the demo and the tests to talk to a live server in-process.
    """
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(AsyncEngine(engine), model_name, api_key), host=host,
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="glassbox-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise GlassboxError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, config: EngineConfig | None = None) -> None:
    """Load the model directory and serve it until interrupted."""
    from pathlib import Path

    import uvicorn

    engine = LLMEngine.from_model_dir(model_dir, config)
    app = create_app(AsyncEngine(engine), model_name or Path(model_dir).resolve().name, api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning")
