"""AsyncEngine: the asynchronous face of the engine for servers — submit requests, stream their outputs, abort.

One background thread owns the engine (an in-process EngineCore or a distributed ReplicaEngine) and steps it
while there is work; submissions and aborts reach it through a command queue, outputs return to each request's
stream. Failure isolation:

* A request's own failure (invalid for this engine, or its sampling raised) ends that request only: its stream
  raises `ValueError` (a client error) or `RequestFailedError`.
* A replica failure (a rank died or hung, or the engine itself raised) marks the engine `dead`: every stream
  raises `EngineDeadError`, new requests are refused at once, and the server's health check turns red so Serve
  rebuilds the replica. While idle the thread probes the engine's health every `health_check_interval_s`, so a
  rank that dies between requests is noticed without a request to trip over it.

Each request's key is generated here, never taken from a client. Streams are bounded: an output that arrives
while the reader still holds an unread one is merged into it (DELTA outputs concatenate, others replace), so a
slow reader costs at most one pending output per request, never a growing queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator

from v4ray.engine.outputs import RequestOutput, merge_delta
from v4ray.engine.sampling import RequestOutputKind, SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed (e.g. a replica rank died); requests cannot be served until it is rebuilt."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine; the engine and every other request go on."""


class _Stream:
    """One request's mailbox: at most one pending item (outputs merge), filled from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: str):
        self.loop, self.kind = loop, kind
        self.pending: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def push(self, item: RequestOutput | BaseException) -> None:  # runs on the stream's event loop
        if isinstance(self.pending, BaseException):
            return  # the request already failed
        if self.pending is None or isinstance(item, BaseException) or self.kind != RequestOutputKind.DELTA:
            self.pending = item
        else:
            merge_delta(self.pending, item)
        self.ready.set()

    async def take(self) -> RequestOutput:
        await self.ready.wait()
        self.ready.clear()
        item, self.pending = self.pending, None
        if isinstance(item, BaseException):
            raise item
        return item


def _push_all(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, out in items:
        stream.push(out)


class AsyncEngine:
    def __init__(self, engine, max_pending: int = 1024, idle_wait_s: float = 0.05,
                 health_check_interval_s: float = 1.0, on_dead=None):
        """engine: anything with add_request / abort / step / has_work (EngineCore, ReplicaEngine), and
        optionally check_health() (raises when the engine can no longer serve). on_dead(reason): called once, on
        the engine thread, after every pending request was failed."""
        self.engine = engine
        self.on_dead = on_dead
        self.max_pending = max_pending
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.dead: str | None = None
        self.idle_wait_s = idle_wait_s
        self.health_check_interval_s = health_check_interval_s
        self._last_health_check = time.monotonic()
        self.num_steps, self.step_wall_s, self.step_cpu_s = 0, 0.0, 0.0  # the engine thread's own time in step()
        self._thread = threading.Thread(target=self._run, name="v4ray-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the outputs of one request as it progresses (in `params.output_kind`); the last one has
        `finished=True`. Stopping the iteration early aborts the request and frees its cache."""
        if self.dead:
            raise EngineDeadError(self.dead)
        rid = uuid.uuid4().hex  # the engine key: never a client-chosen id
        stream = _Stream(asyncio.get_running_loop(), params.output_kind)
        with self._lock:
            if len(self._streams) >= self.max_pending:
                raise QueueFullError(f"{len(self._streams)} requests in flight (limit {self.max_pending})")
            self._streams[rid] = stream
        self._commands.put(("add", rid, prompt_ids, params, prompt))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await stream.take()
                if out.error is not None:
                    raise RequestFailedError(out.error)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self._abort(rid)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- the engine thread ------------------------------------------------------------------------------
    def _abort(self, rid: str) -> None:
        self._commands.put(("abort", rid))
        self._wake.set()

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand (request id, output or error) pairs to their streams: one wake-up per event loop per call."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            s = self._streams.get(rid)
            if s is not None:
                by_loop.setdefault(s.loop, []).append((s, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, items)
            except RuntimeError:  # the readers' event loop is closed: nobody is listening
                pass

    def _die(self, reason: str) -> None:
        """The engine can no longer serve: fail every request now and every later one at once."""
        self.dead = reason
        log.error("engine dead: %s", reason)
        self._deliver([(rid, EngineDeadError(reason)) for rid in list(self._streams)])
        if self.on_dead is not None:
            self.on_dead(reason)

    def _is_replica_failure(self, e: BaseException) -> bool:
        from v4ray.cluster.replica import ReplicaError

        return isinstance(e, ReplicaError) or bool(getattr(self.engine, "failed", None))

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
                except ValueError as e:  # invalid for this engine (too long, bad token id): the client's error
                    self._deliver([(rid, e)])
                except Exception as e:  # noqa: BLE001
                    if self._is_replica_failure(e):
                        raise
                    log.exception("add_request %s failed", rid)
                    self._deliver([(rid, RequestFailedError(f"{type(e).__name__}: {e}"))])
            elif cmd[0] == "abort":
                try:
                    self.engine.abort(cmd[1])
                except Exception as e:  # noqa: BLE001 - an abort must never kill the loop
                    if self._is_replica_failure(e):
                        raise
                    log.warning("abort of %s failed: %s", cmd[1], e)

    def _check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is None or time.monotonic() - self._last_health_check < self.health_check_interval_s:
            return
        check()
        self._last_health_check = time.monotonic()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - whatever ends the loop, the engine is dead
            self._die(f"{type(e).__name__}: {e}")

    def _loop(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_work():
                self._check_health()
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            t0, c0 = time.perf_counter(), time.thread_time()
            outs = self.engine.step()
            self.num_steps += 1
            self.step_wall_s += time.perf_counter() - t0
            self.step_cpu_s += time.thread_time() - c0
            self._deliver([(out.request_id, out) for out in outs])
