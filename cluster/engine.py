"""AsyncEngine: the asynchronous face of the engine for servers — submit requests, stream their outputs, abort.

One background thread owns the engine (an in-process EngineCore or a distributed ReplicaEngine) and steps it
while there is work; submissions and aborts reach it through a command queue, outputs return to each request's
asyncio queue. A consumer that stops iterating (a disconnected client) aborts its request and frees its cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from v4ray.model.outputs import RequestOutput
from v4ray.model.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed (e.g. a replica rank died); requests cannot be served until it is rebuilt."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float


class AsyncEngine:
    def __init__(self, engine, max_pending: int = 1024, idle_wait_s: float = 0.05):
        """engine: anything with add_request / abort / step / has_work (EngineCore, ReplicaEngine)."""
        self.engine = engine
        self.max_pending = max_pending
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = False
        self.dead: str | None = None
        self.idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._loop, name="v4ray-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs of one request as they progress; the last one has `finished=True`."""
        if self.dead:
            raise EngineDeadError(self.dead)
        rid = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        with self._lock:
            if len(self._streams) >= self.max_pending:
                raise QueueFullError(f"{len(self._streams)} requests in flight (limit {self.max_pending})")
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in flight")
            self._streams[rid] = stream
        self._commands.put(("add", rid, prompt_ids, params, prompt))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)
            with self._lock:
                self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- the engine thread ------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        s = self._streams.get(rid)
        if s is not None:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt_ids, params, prompt = cmd
                if rid not in self._streams:
                    continue  # the caller gave up before we got here
                try:
                    self.engine.add_request(rid, prompt_ids, params, prompt)
                except ValueError as e:
                    self._deliver(rid, e)
            elif cmd[0] == "abort":
                try:
                    self.engine.abort(cmd[1])
                except Exception as e:  # noqa: BLE001 - an abort must never kill the loop
                    log.warning("abort of %s failed: %s", cmd[1], e)

    def _loop(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_work():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine is unusable: fail every request
                self.dead = f"engine step failed: {e}"
                log.error(self.dead)
                for rid in list(self._streams):
                    self._deliver(rid, EngineDeadError(self.dead))
                return
            for out in outs:
                self._deliver(out.request_id, out)
