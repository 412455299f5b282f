"""`glassbox serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine.

Endpoints: /v1/completions, /v1/chat/completions (both with SSE streaming), /v1/models, /health, /metrics.
Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, with 4xx codes for bad input. A
client that disconnects, streaming or not, has its request aborted, which frees its KV blocks at the next engine
step.

Limits bound what one client can take (`ServerLimits`): connections beyond a cap are answered 503 and closed as they
are accepted, a connection that has not delivered its whole request within a timeout gets a 408 (slowloris),
bodies are capped (413), and so are prompts per request. The process's file-descriptor limit is raised to its
hard limit at start and the connection cap fitted under it, and a log message that repeats (a failing accept
loop logs a traceback per attempt) is written at most once per `RepeatedLogFilter.interval_s`. Prompts are
tokenized in a worker thread, with the GIL released, so a long one does not stall /health or other streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, AsyncIterator, Iterator

import h11
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from glassbox.errors import GlassboxError
from glassbox.inference.async_engine import AsyncEngine, EngineDeadError
from glassbox.inference.engine import EngineConfig, LLMEngine, RequestOutput
from glassbox.inference.metrics import ServerMetrics
from glassbox.inference.protocol import ChatCompletionRequest, CompletionRequest, error_param
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.sequence import TokenLogprob

logger = logging.getLogger("glassbox.server")

# How often, at least, a non-streaming request checks that its client is still connected while it waits.
DISCONNECT_POLL_S = 0.1
# uvicorn's listen backlog, which is also how many connections asyncio accepts in one go before any is handled.
LISTEN_BACKLOG = 2048
# File descriptors kept free of connections for everything else the process opens.
FD_MARGIN = 32


@dataclass
class ServerLimits:
    """What one client may take of the server (the `glassbox serve` options of the same names).

    `limit_concurrency`: open connections; one beyond is answered 503 and closed at once (lowered at start to fit
    the file-descriptor limit). `max_body_bytes`: a request body (413 beyond). `max_prompts`: prompts in one
    completions request (400 beyond; each carries up to n=32 samples). `request_timeout_s`: how long a client has
    to deliver a whole request, from its first byte (on a new connection, from connecting); 408 after. A request
    that has arrived runs as long as it needs; an idle keep-alive connection closes after uvicorn's 5 s.
    """

    limit_concurrency: int = 512
    max_body_bytes: int = 4 * 2**20
    max_prompts: int = 64
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("limit_concurrency", "max_body_bytes", "max_prompts", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise GlassboxError(f"server: {name} must be > 0, got {getattr(self, name)}")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    # A value that fails a union fails every branch; a branch that got the right type says what is wrong with it.
    err = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('msg')}", None
    param = error_param(tuple(err.get("loc", ())))
    return (f"{param}: {err.get('msg')}" if param else str(err.get("msg"))), param


def _failure(item: Exception) -> APIError:
    """The HTTP error for an exception the engine delivered in place of a request's output."""
    if isinstance(item, EngineDeadError):
        return APIError(503, str(item), "server_error", code="engine_dead")
    if isinstance(item, GlassboxError):
        return APIError(400, str(item), param=getattr(item, "param", None))
    return APIError(500, f"generation failed: {item}", "server_error")


class _Choice:
    """What has been sent of one choice of a streamed response."""

    def __init__(self) -> None:
        self.text_sent = 0
        self.tokens_sent = 0
        self.started = False
        self.finished = False


class _Guard:
    """ASGI middleware: reads each request body whole before the app sees it, answering 413 as soon as it is
    declared or counted over `max_bytes`, and counts the responses with an error status."""

    def __init__(self, app: Any, max_bytes: int, metrics: ServerMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.request_error(message["status"])
            await send(message)

        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        body = None if declared is not None and int(declared) > self.max_bytes else await self._read(receive)
        if body is None:
            too_large = APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="body_too_large")
            await too_large.response()(scope, receive, counted_send)
            return
        if body is False:
            return                      # the client left before its body arrived
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, counted_send)

    async def _read(self, receive: Any) -> bytes | None | bool:
        """The body; None once it passes the limit; False if the client disconnected."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    llm = engine.engine
    tokenizer = llm.tokenizer
    created = int(time.time())
    expected_auth = None if api_key is None else f"Bearer {api_key}".encode()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="glassbox", lifespan=lifespan)
    app.add_middleware(_Guard, max_bytes=limits.max_body_bytes, metrics=engine.metrics)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own: unknown routes, wrong methods, and bodies it cannot decode (invalid UTF-8).
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):
            message = f"request body is not valid UTF-8: {exc.__cause__}"
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, message, type_).response(exc.headers)

    @app.exception_handler(GlassboxError)
    async def _glassbox_error(_: Request, exc: GlassboxError) -> JSONResponse:
        return APIError(400, str(exc), param=getattr(exc, "param", None)).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _failure(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Runs outside _Guard (Starlette's outermost middleware), so it counts its own 500.
        engine.metrics.request_error(500)
        return APIError(500, f"internal error ({type(exc).__name__})", "server_error").response()

    async def check_key(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, expected_auth):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {model_name!r})",
                           param="model", code="model_not_found")

    async def encode(texts: list[str]) -> list[list[int]]:
        if tokenizer is None:
            raise APIError(400, "this model directory has no tokenizer.json: send prompts as token ids")
        return await asyncio.to_thread(tokenizer.encode_batch, texts)

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

    def submit(prompts: list[list[int]], params: list[SamplingParams], prefix: str,
               priority: int) -> tuple[list[str], asyncio.Queue]:
        for prompt, p in zip(prompts, params):
            llm.validate_prompt(prompt, p)
        queue: asyncio.Queue = asyncio.Queue()
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                engine.submit(f"{prefix}-{i}", prompt, p, queue, priority=priority)
                ids.append(f"{prefix}-{i}")
        except Exception:
            for rid in ids:
                engine.abort(rid)
            raise
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
                    raise _failure(item)
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
                    error = _failure(item)
                    engine.metrics.request_error(error.status)
                    yield sse(error.body())
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
    async def health() -> JSONResponse:
        state = engine.health()
        if state["status"] == "ok":
            return JSONResponse({"status": "ok"})
        # "dead" (the engine thread has stopped) or "stalled" (a step has run too long): a prober should restart us.
        return JSONResponse({"status": state["status"], "last_step_age_s": round(state["last_step_age_s"], 1)},
                            status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

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
        if isinstance(raw, list) and raw and not isinstance(raw[0], int) and len(raw) > limits.max_prompts:
            raise APIError(400, f"prompt: at most {limits.max_prompts} prompts per request, got {len(raw)}",
                           param="prompt")
        if isinstance(raw, str):
            prompts = await encode([raw])
        elif not raw:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        elif isinstance(raw[0], str):
            prompts = await encode(raw)
        elif isinstance(raw[0], int):
            prompts = [list(raw)]
        else:
            prompts = [list(p) for p in raw]
        if any(not p for p in prompts):
            raise APIError(400, "prompt: must not be empty", param="prompt")
        params = [sampling(req, req.max_tokens or 16, req.logprobs)] * len(prompts)
        cid = f"cmpl-{uuid.uuid4().hex}"
        ids, queue = submit(prompts, params, cid, req.priority)
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if req.stream:
            return StreamingResponse(stream(ids, queue, req.n, False, prompts, base, req.include_usage),
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
        if tokenizer is None:
            raise APIError(400, "chat needs the model directory's tokenizer.json: use /v1/completions with token ids")
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        prompt = (await encode([text]))[0]
        if not prompt:
            raise APIError(400, "messages: the rendered chat prompt is empty", param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, llm.max_model_len - len(prompt))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        ids, queue = submit([prompt], [sampling(req, max_tokens, logprobs)], cid, req.priority)
        base = {"id": cid, "object": "chat.completion.chunk" if req.stream else "chat.completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            return StreamingResponse(stream(ids, queue, req.n, True, [prompt], base, req.include_usage),
                                     media_type="text/event-stream")
        finals = await collect(ids, queue, request)
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason,
                    "logprobs": chat_logprobs(o.logprobs) if o.logprobs is not None else None}
                   for o in finals[ids[0]].outputs]
        return {**base, "choices": choices, "usage": usage([prompt], finals)}

    from glassbox.inference.dynasor.server_api import mount_dynasor    # here: it imports this module
    mount_dynasor(app, engine, check_key, check_model)
    return app


def _refuse(transport: asyncio.Transport, error: APIError) -> None:
    """Answer a connection outside uvicorn's HTTP state machine (no request yet, or half of one) and close it."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if error.status == 503 else "") + "\r\n")
    transport.write(head.encode() + body)
    transport.close()


def _guarded_protocol(limits: ServerLimits, metrics: ServerMetrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection cap applied as connections are accepted, and a deadline for each
    request to arrive: `request_timeout_s` from its first byte (or, on a new connection, from connecting)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.deadline: asyncio.TimerHandle | None = None
            # uvicorn's limit_concurrency answers 503 only once a request arrives, so idle connections can pile up
            # to the descriptor limit; here one over the cap holds its descriptor only until it is turned away.
            if len(self.connections) > limits.limit_concurrency:
                metrics.request_error(503)
                logger.warning("refused a connection: %d open, the limit is %d", len(self.connections),
                               limits.limit_concurrency)
                _refuse(transport, APIError(503, "the server is at its connection limit: retry later", "server_error",
                                            code="too_many_connections"))
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                self._arm()                         # a request's first byte starts its clock
            super().data_received(data)

        def _arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(limits.request_timeout_s, self._request_overdue)

        def _request_overdue(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:              # headers in, body still coming
                if self.cycle is not None and self.cycle.response_started:
                    self.transport.close()          # answered early (413): stop reading the rest
                    return
            elif state is h11.IDLE:
                if not self.conn.trailing_data[0]:  # no byte of a request yet
                    if self.cycle is None:
                        self.transport.close()      # connected, never sent anything
                    return                          # between requests: uvicorn's keep-alive timeout governs
            else:
                return                              # the request is in: it runs as long as it needs
            metrics.request_error(408)
            logger.warning("closed a connection whose request did not arrive within %s s", limits.request_timeout_s)
            _refuse(self.transport, APIError(408, f"the request did not arrive within {limits.request_timeout_s} s",
                                             code="request_timeout"))

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None
            super().connection_lost(exc)

    return GuardedH11Protocol


def _fit_fd_limit(limit: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (any process may) and fit the connection cap and the listen
    backlog under it. Returns (cap, backlog).

    asyncio accepts up to a backlog of connections per loop iteration, and a connection turned away holds its
    descriptor for about three iterations (accepted, refused, closed): cap + 3 x backlog + the descriptors already
    open must fit, or a flood runs the process out of descriptors before the cap can turn anyone away.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass                                    # an unlimited hard limit above the kernel's nr_open
    if soft == resource.RLIM_INFINITY:
        return limit, LISTEN_BACKLOG
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    spare = soft - in_use - FD_MARGIN
    backlog = min(LISTEN_BACKLOG, spare // 4)
    cap = min(limit, spare - 3 * backlog)
    if backlog < 1 or cap < 1:
        raise GlassboxError(f"only {soft} file descriptors (ulimit -n) with {in_use} open: too few to serve")
    if cap < limit:
        logger.warning("connection limit lowered from %d to %d to fit the file-descriptor limit of %d (ulimit -n)",
                       limit, cap, soft)
    return cap, backlog


class RepeatedLogFilter(logging.Filter):
    """Passes a log message at most once per `interval_s` for each (logger, level, first line, exception type); the
    next one through says how many were held back. An accept loop out of file descriptors otherwise writes the
    same traceback on every retry, and a flood of refused connections a warning each."""

    interval_s = 10.0
    max_keys = 1024

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._seen: dict[tuple, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else repr(record.msg)
        key = (record.name, record.levelno, msg.split("\n", 1)[0], record.exc_info[0] if record.exc_info else None)
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[key] = (last, held + 1)
                return False
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{msg} [{held} more like this in the last {now - last:.0f} s not logged]"
        return True


_REPEATS = RepeatedLogFilter()


def _limit_repeated_logs() -> None:
    # The loggers a misbehaving network writes to: asyncio's accept loop, uvicorn's protocol errors, and ours.
    for name in ("asyncio", "uvicorn.error", logger.name):
        log = logging.getLogger(name)
        if _REPEATS not in log.filters:
            log.addFilter(_REPEATS)


def _uvicorn_server(engine: AsyncEngine, model_name: str, api_key: str | None, host: str, port: int,
                    limits: ServerLimits) -> uvicorn.Server:
    cap, backlog = _fit_fd_limit(limits.limit_concurrency)
    limits = dataclasses.replace(limits, limit_concurrency=cap)
    app = create_app(engine, model_name, api_key, limits)
    # uvicorn itself answers 503 once open connections or requests in flight reach its limit_concurrency, i.e. it
    # serves one fewer than that; the guarded protocol holds the cap.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", backlog=backlog,
                            limit_concurrency=cap + 1, http=_guarded_protocol(limits, engine.metrics))
    _limit_repeated_logs()             # after uvicorn.Config, which configures logging
    return uvicorn.Server(config)


@contextmanager
def running_server(engine: LLMEngine, model_name: str, api_key: str | None = None,
                   host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None) -> Iterator[str]:
    """Serve `engine` from a background thread for the duration of a `with` block; yields the base URL.

    Port 0 picks a free port. Used by the demo and the tests to talk to a live server in-process.
    """
    import socket

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = _uvicorn_server(AsyncEngine(engine), model_name, api_key, host, port, limits or ServerLimits())
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
          model_name: str | None = None, config: EngineConfig | None = None,
          limits: ServerLimits | None = None) -> None:
    """Load the model directory and serve it until interrupted."""
    import ipaddress
    from pathlib import Path

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and api_key is None:
        logger.warning("serving on %s without an API key: anyone who reaches the port can use the model", host)
    engine = LLMEngine.from_model_dir(model_dir, config)
    server = _uvicorn_server(AsyncEngine(engine), model_name or Path(model_dir).resolve().name, api_key, host, port,
                             limits or ServerLimits())
    server.run()
