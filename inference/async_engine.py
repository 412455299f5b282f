"""Drives an `LLMEngine` from its own thread beside an asyncio server.

Handlers submit requests and aborts through a locked inbox and get an asyncio queue per request; the engine
thread applies the inbox between steps (so the engine itself stays single-threaded), runs steps while there is
work, and hands each output to its request's queue on the server's event loop.

No exception ends the thread: one raised while adding a request fails that request, one raised by a step fails
the requests in flight, and the loop serves on. `health()` tells a prober whether the thread is alive and still
making progress. Should the thread end anyway (shutdown), every request still waiting gets an `EngineDeadError`
rather than waiting forever, and `submit` refuses new ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.inference.engine import LLMEngine, RequestOutput
from glassbox.inference.metrics import ServerMetrics
from glassbox.inference.sampling_params import SamplingParams

# How long a step may run before health() calls the engine stalled.
STALL_AFTER_S = 60.0


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: the request cannot be served (HTTP 503, not the client's fault)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.metrics = ServerMetrics()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, list[int], SamplingParams, float, float]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._dead = False
        self._beat = time.monotonic()
        self._last_error: tuple[str, float] | None = None
        self._thread = threading.Thread(target=self._run, name="glassbox-engine", daemon=True)
        self.metrics.update_engine(engine.stats())

    def start(self) -> None:
        self._beat = time.monotonic()
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               queue: asyncio.Queue | None = None, priority: float = 0.0) -> asyncio.Queue:
        """Queue a request (validated here, so bad input fails in the caller) and return the queue its outputs go
        to (`queue`, when given, lets several requests share one). `priority` orders it under the priority policy,
        lower first. Raises GlassboxError for bad input and EngineDeadError once the engine thread has stopped."""
        self.engine.validate_prompt(prompt_ids, params, priority)
        queue = queue or asyncio.Queue()
        with self._lock:
            if self._dead:
                raise EngineDeadError("the engine is not running: the request cannot be served")
            if request_id in self._streams:
                raise GlassboxError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (queue, asyncio.get_running_loop())
            self._inbox.append((request_id, prompt_ids, params, time.monotonic(), priority))
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def notify(self) -> None:
        """Wake the engine thread: an engine extension (Dynasor's programs) has queued work of its own."""
        self._wake.set()

    def health(self, stall_after_s: float = STALL_AFTER_S) -> dict[str, Any]:
        """The engine loop's state, for a /health probe.

        `status` is "ok", "stalled" (alive, but no progress for `stall_after_s`: a step that hangs) or "dead" (the
        thread is not running: not started, shut down, or ended). `last_step_age_s` is the time since the loop last
        made progress: it finishes a step, or an idle wait of at most a second, so it stays small while the engine
        is healthy, busy or idle.
        `last_error` ("Type: message", or None) is the latest exception that failed a request, `last_error_age_s`
        how long ago; `num_failed_requests` counts requests failed so far; `num_unfinished` those in the engine.
        """
        alive = self._thread.is_alive()
        age = time.monotonic() - self._beat
        error, error_time = self._last_error or (None, None)
        return {
            "status": "dead" if not alive else "stalled" if age > stall_after_s else "ok",
            "alive": alive,
            "last_step_age_s": age,
            "num_unfinished": len(self.engine.requests),
            "num_failed_requests": self.engine.num_failed_requests,
            "last_error": error,
            "last_error_age_s": None if error_time is None else time.monotonic() - error_time,
        }

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        queue, loop = entry
        if isinstance(item, Exception) or item.finished:
            with self._lock:
                self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass     # the server's loop closed during shutdown

    def _record(self, out: RequestOutput) -> None:
        n_gen = sum(len(o.token_ids) for o in out.outputs)
        self.metrics.request_finished([o.finish_reason or "abort" for o in out.outputs], len(out.prompt_token_ids),
                                      n_gen, *out.latency())

    def _note_error(self, error: Exception) -> None:
        self._last_error = (f"{type(error).__name__}: {error}", time.monotonic())

    def _fail(self, request_id: str, error: Exception) -> None:
        """Fail one request (in the engine or not yet added), count it, and hand the error to its client."""
        self._note_error(error)
        out = self.engine.fail(request_id, error)
        if out is not None:
            self._record(out)
        self._deliver(request_id, error)

    def _fail_in_flight(self, error: Exception) -> None:
        """Fail every request in the engine, and any other with a client waiting that is not still queued in
        the inbox, so that no client waits on a request the loop lost track of."""
        for request_id in list(self.engine.requests):
            self._fail(request_id, error)
        with self._lock:
            queued = {entry[0] for entry in self._inbox}
            lost = [request_id for request_id in self._streams if request_id not in queued]
        for request_id in lost:
            self._fail(request_id, error)

    def _apply_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for request_id, prompt_ids, params, arrival, priority in inbox:
            try:
                self.engine.add_request(request_id, prompt_ids, params, arrival_time=arrival, priority=priority)
            except GlassboxError as e:     # bad input, caught here rather than in submit: the client's error
                self._deliver(request_id, e)
            except Exception as e:
                if request_id not in self.engine.requests:     # never added: count its samples here
                    self.metrics.request_finished(["error"] * params.n, len(prompt_ids), 0, None, None)
                self._fail(request_id, e)
        for request_id in aborts:
            out = self.engine.abort(request_id)
            if out is not None:
                self._record(out)
            with self._lock:
                self._streams.pop(request_id, None)

    def _iterate(self) -> None:
        self._apply_inbox()
        if not self.engine.has_unfinished():
            self.metrics.update_engine(self.engine.stats())
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return
        outputs = self.engine.step()
        self._beat = time.monotonic()
        for out in outputs:
            if out.finished:
                self._record(out)
            if out.error is not None:
                self._note_error(out.error)
                self._deliver(out.request_id, out.error)
            else:
                self._deliver(out.request_id, out)
        self.metrics.update_engine(self.engine.stats())

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._beat = time.monotonic()
                try:
                    self._iterate()
                except Exception as e:     # a failed step fails the requests in flight, not the server
                    self._fail_in_flight(e)
        finally:
            with self._lock:
                self._dead = True
                waiting = list(self._streams)
            for request_id in waiting:
                self._deliver(request_id, EngineDeadError("the engine stopped before the request finished"))
