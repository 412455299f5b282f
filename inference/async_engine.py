"""Drives an `LLMEngine` from its own thread beside an asyncio server.

Handlers submit requests and aborts through a locked inbox and get an asyncio queue per request; the engine
thread applies the inbox between steps (so the engine itself stays single-threaded), runs steps while there is
work, and hands each output to its request's queue on the server's event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time

from glassbox.errors import GlassboxError
from glassbox.inference.engine import LLMEngine, RequestOutput
from glassbox.inference.metrics import ServerMetrics
from glassbox.inference.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.metrics = ServerMetrics()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, list[int], SamplingParams, float]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="glassbox-engine", daemon=True)
        self.metrics.update_engine(engine.stats())

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue a request (validated here, so bad input fails in the caller) and return the queue its outputs go
        to (`queue`, when given, lets several requests share one)."""
        self.engine.validate_prompt(prompt_ids, params)
        queue = queue or asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (queue, asyncio.get_running_loop())
            self._inbox.append((request_id, prompt_ids, params, time.monotonic()))
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

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

    def _apply_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for request_id, prompt_ids, params, arrival in inbox:
            try:
                self.engine.add_request(request_id, prompt_ids, params, arrival_time=arrival)
            except GlassboxError as e:
                self._deliver(request_id, e)
        for request_id in aborts:
            out = self.engine.abort(request_id)
            if out is not None:
                self._record(out)
            with self._lock:
                self._streams.pop(request_id, None)

    def _run(self) -> None:
        while not self._stopping:
            self._apply_inbox()
            if not self.engine.has_unfinished():
                self.metrics.update_engine(self.engine.stats())
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:     # a failed step fails its requests, not the server
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, e)
                continue
            for out in outputs:
                if out.finished:
                    self._record(out)
                self._deliver(out.request_id, out)
            self.metrics.update_engine(self.engine.stats())
