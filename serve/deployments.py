"""Ray Serve deployments: `V4Server` owns one model replica and its engine; `OpenAIIngress` speaks the OpenAI API.

V4Server runs the engine in its own process (num_expert_shards = 0) or drives a Router/ExpertShard replica placed
in the deployment's own placement group. OpenAIIngress (FastAPI) validates requests, counts and limits them,
streams Server-Sent Events, maps failures to OpenAI-shaped errors and exports Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from v4ray.model.config import V4Config
from v4ray.model.tokenizer import V4Tokenizer

from v4ray.model.chat import CALLS_START, split_reasoning
from v4ray.engine.sampling import RequestOutputKind

from .protocol import (DETOKENIZE_FIELDS, TOKENIZE_FIELDS, APIError, Parsed, ToolCallStream, chat_logprobs,
                       chat_message, check_fields, completion_logprobs, final_body, parse_json, parse_request, sse,
                       tool_calls_of, usage_counts)

log = logging.getLogger("v4ray.serve")
# A live replica answers `stats` in milliseconds (its engine steps in another thread); none answering within this
# means none is serving (dead, or being rebuilt: Serve holds the call until one exists), so /ready says 503.
READY_TIMEOUT_S = 3.0
DEAD_EXIT_DELAY_S = 5.0   # a replica whose engine died exits this long after failing its requests



class V4Server:
    """One model replica behind an AsyncEngine (bounded queue, streaming, abort on cancel)."""

    def __init__(self, config: dict):
        import ray
        import torch
        from ray import serve

        from v4ray.cluster.build import build_engine
        from v4ray.engine.core import EngineCore
        from v4ray.serve.async_engine import AsyncEngine
        from v4ray.serve.config import ServeConfig

        self.cfg = cfg = ServeConfig(**config)
        # torch's intra-op threads follow the CPUs this replica reserved. Ray sets OMP_NUM_THREADS for an actor
        # only when the variable is unset, so an inherited value (a driver's, a test runner's) would otherwise
        # oversubscribe the node: 2 threads on a 1-CPU reservation made each decode step ~1.5x slower.
        torch.set_num_threads(_reserved_cpus())
        engine_config = cfg.engine_config()
        self.device = None   # the single-process engine's, resolved once here (a replica's ranks resolve their own)
        if cfg.num_expert_shards == 0:
            from v4ray.engine.build import select_device

            self.device = select_device(cfg.device)   # Ray's CUDA_VISIBLE_DEVICES: cuda:0 is this actor's GPU
            engine_config = engine_config.model_copy(update={"device": str(self.device)})
        engine = build_engine(engine_config)
        self._local = engine if isinstance(engine, EngineCore) else None
        self.replica = None if self._local is not None else engine.replica
        self.ranks = self.replica.actor_info() if self.replica is not None else []  # rank, role, pid, node
        self.engine = AsyncEngine(engine, max_pending=cfg.max_num_seqs * cfg.num_routers + cfg.max_queue_len,
                                  on_dead=self._exit_soon)
        self.started = time.time()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.address = ray.util.get_node_ip_address()   # this replica's node (its ranks report their own)

    async def generate(self, prompt_ids: list[int], params, prompt: str | None = None):
        """Stream one request's outputs (the engine generates its key; no client id reaches the engine). The first
        names this replica."""
        first = True
        async for out in self.engine.generate(prompt_ids, params, prompt):
            if first:
                out.replica, first = self.replica_id, False
            yield out

    def stats(self) -> dict:
        e = self.engine
        s = {"replica": self.replica_id, "address": self.address, "requests_in_flight": e.num_requests,
             "dead": e.dead, "engine_steps": e.num_steps,
             "engine_step_wall_s": e.step_wall_s, "engine_step_cpu_s": e.step_cpu_s, "ranks": self.ranks,
             "device": str(self.device) if self.device is not None else None}
        if self._local is not None:
            s.update(self._local.stats())
            pc = self._local.runner.prefix_cache
            s["prefix_cache"] = pc.stats() if pc is not None else None
        elif self.replica is not None and not self.replica.failed:
            rs = self.replica.stats()
            eng = [r["engine"] for r in rs["routers"]]
            s.update({k: sum(r[k] for r in eng) for k in ("waiting", "running", "kv_blocks", "kv_free_blocks",
                                                        "preemptions")})
            s["expert_imbalance"] = max(rs["shard_imbalance"] or [0.0])
        return s

    @staticmethod
    def _exit_soon(reason: str) -> None:
        """A dead engine takes its replica down: after DEAD_EXIT_DELAY_S (the failed requests' errors are on their
        way) the process exits, Ray kills the ranks it owns, and Serve starts a new replica at once. Left alive, a
        replica answering every request with an immediate 503 looks idle, and least-loaded routing sends it the
        traffic until health checks and a graceful stop catch up (bench/soak.py saw ~100 s of that)."""
        def exit_later():
            time.sleep(DEAD_EXIT_DELAY_S)
            log.error("exiting the replica process: its engine is dead (%s)", reason)
            logging.shutdown()
            os._exit(1)

        threading.Thread(target=exit_later, name="v4ray-exit", daemon=True).start()

    def check_health(self) -> None:
        """Serve's health check: red as soon as the engine is dead (Serve then replaces this replica)."""
        if self.engine.dead:
            raise RuntimeError(self.engine.dead)

    def __del__(self):
        try:
            self.engine.shutdown()
            if self.replica is not None:
                self.replica.shutdown()
        except Exception:  # noqa: BLE001
            pass


def _reserved_cpus() -> int:
    """CPUs Ray assigned to this actor (a placement-group bundle's CPU counts once), at least 1."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    return max(1, int(max((v for k, v in assigned.items() if k == "CPU" or k.startswith("CPU_group_")), default=1)))


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    return reg, {
        "requests": Counter("v4ray_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                            registry=reg),
        "prompt_tokens": Counter("v4ray_prompt_tokens", "Prompt tokens processed", registry=reg),
        "generation_tokens": Counter("v4ray_generation_tokens", "Tokens generated", registry=reg),
        "ttft": Histogram("v4ray_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=reg),
        "tpot": Histogram("v4ray_time_per_output_token_seconds", "Time per output token after the first",
                          buckets=buckets, registry=reg),
        "e2e": Histogram("v4ray_e2e_request_latency_seconds", "End-to-end request latency", buckets=buckets,
                         registry=reg),
        "queue": Gauge("v4ray_num_requests_waiting", "Requests waiting for admission", registry=reg),
        "running": Gauge("v4ray_num_requests_running", "Sequences running", registry=reg),
        "kv": Gauge("v4ray_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=reg),
        "prefix_hit": Gauge("v4ray_prefix_cache_hit_rate", "Prefix-cache lookup hit rate", registry=reg),
        "imbalance": Gauge("v4ray_expert_load_imbalance", "Max/mean tokens per expert shard (last layer stats)",
                           registry=reg),
        "preemptions": Gauge("v4ray_num_preemptions", "Preemptions so far", registry=reg),
    }


# FastAPI's own /docs, /redoc and /openapi.json are off; `enable_docs: true` serves /docs and /openapi.json below.
app = FastAPI(title="v4ray", description="OpenAI-compatible API for DeepSeek-V4 on Ray", docs_url=None,
              redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse(APIError(400, "invalid request").body(), status_code=400)


# Set by the ingress replica from its config (the app object is module-level, as Serve's ingress needs).
_SETTINGS: dict = {"key": None, "docs": False}


def _auth(request: Request) -> None:
    key = _SETTINGS["key"]
    if key is None:
        return
    sent = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       type_="authentication_error", code="invalid_api_key")


v1 = APIRouter(dependencies=[Depends(_auth)])


class OpenAIIngress:
    def __init__(self, server, config: dict):
        from v4ray.serve.config import ServeConfig

        self.server = server
        self.cfg = cfg = ServeConfig(**config)
        path = cfg.resolve_model()
        self.tokenizer = V4Tokenizer.from_dir(path)
        self.max_model_len = cfg.max_model_len or V4Config.from_file(path).max_position_embeddings
        self.model_name = cfg.served_model_name or cfg.model.rstrip("/").split("/")[-1]
        _SETTINGS["key"], _SETTINGS["docs"] = cfg.api_key(), cfg.enable_docs
        self.registry, self.m = _metrics()
        self.created = int(time.time())

    # ---- plumbing ---------------------------------------------------------------------------------------
    async def _body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.cfg.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of {self.cfg.max_body_bytes}",
                           code="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.cfg.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {self.cfg.max_body_bytes} bytes",
                               code="request_too_large")
        return parse_json(raw)

    def _count(self, endpoint: str, status: int) -> None:
        self.m["requests"].labels(endpoint, str(status)).inc()

    def _engine_error(self, e: BaseException) -> APIError:
        from v4ray.serve.async_engine import EngineDeadError, QueueFullError, RequestFailedError

        cause = getattr(e, "cause", None) or e
        if isinstance(cause, QueueFullError):
            return APIError(429, f"server busy: {cause}", type_="rate_limit_error", code="queue_full",
                            headers={"Retry-After": "1"})
        from ray.exceptions import RayActorError

        if isinstance(cause, (EngineDeadError, RayActorError)):   # RayActorError: ActorDied-, ActorUnavailableError
            return APIError(503, "the model replica is unavailable; it is being rebuilt, retry shortly",
                            type_="server_error", code="replica_unavailable", headers={"Retry-After": "5"})
        if isinstance(cause, RequestFailedError):
            return APIError(500, "this request failed in the engine; other requests are unaffected",
                            type_="server_error", code="request_failed")
        if isinstance(cause, ValueError):
            return APIError(400, str(cause), param=getattr(cause, "param", None))
        return APIError(500, f"internal error ({type(cause).__name__})", type_="server_error")

    @staticmethod
    def _client_request_id(request: Request) -> str | None:
        """The client's x-request-id, echoed and logged only (never an engine key); overlong values dropped."""
        rid = request.headers.get("x-request-id")
        return rid if rid and len(rid) <= 256 and rid.isprintable() else None

    async def _run(self, endpoint: str, kind: str, request: Request):
        rid = uuid.uuid4().hex[:24]  # names the response (cmpl-<rid>); the engine keys requests itself
        client_rid = self._client_request_id(request)
        try:
            p = parse_request(kind, await self._body(request), self.tokenizer, self.max_model_len,
                              self.cfg.max_n, self.model_name, self.cfg.max_output_entries)
        except APIError as e:
            self._count(endpoint, e.status)
            raise
        p.request_id = rid
        # Streams get only what is new each step; a non-streamed request gets one output when it finishes.
        p.params.output_kind = RequestOutputKind.DELTA if p.stream else RequestOutputKind.FINAL_ONLY
        p.params.decode_logprobs = False  # the response is rendered here, token strings included
        log.info("request %s (client id %s) %s: %d prompt tokens, max_tokens %d, n %d, stream %s", rid, client_rid,
                 endpoint, len(p.prompt_ids), p.params.max_tokens, p.params.n, p.stream)
        gen = self.server.options(stream=True).generate.remote(p.prompt_ids, p.params, p.prompt_text)
        t0 = time.monotonic()
        deadline = t0 + self.cfg.request_timeout_s
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()
            self._count(endpoint, 408)
            raise APIError(408, f"request {rid} timed out after {self.cfg.request_timeout_s:.0f}s",
                           code="timeout")
        except asyncio.CancelledError:  # the client went away: free the request's cache
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            gen.cancel()
            err = self._engine_error(e)
            self._count(endpoint, err.status)
            raise err
        headers = {} if client_rid else {"x-request-id": rid}  # Serve's proxy echoes a client's x-request-id
        if first.replica:
            headers["x-v4ray-replica"] = first.replica
        if p.stream:
            self.m["ttft"].observe(time.monotonic() - t0)
            self.m["prompt_tokens"].inc(len(p.prompt_ids))
            self._count(endpoint, 200)
            return StreamingResponse(self._sse(p, first, gen, t0, deadline), media_type="text/event-stream",
                                     headers=headers)
        self.m["prompt_tokens"].inc(len(p.prompt_ids))
        out = first
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                async for out in gen:
                    pass
        except TimeoutError:
            gen.cancel()
            self._count(endpoint, 408)
            raise APIError(408, f"request {rid} timed out after {self.cfg.request_timeout_s:.0f}s", code="timeout")
        except asyncio.CancelledError:  # the client went away: free the request's cache
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            err = self._engine_error(e)
            self._count(endpoint, err.status)
            raise err
        self._finish(sum(len(c.token_ids) for c in out.outputs), t0)
        self._count(endpoint, 200)
        if p.params.logprobs is None:
            return JSONResponse(final_body(p, out, self.model_name, self.tokenizer), headers=headers)
        # n x max_tokens x (logprobs + 1) entries take tens of ms to render: off the event loop, which keeps
        # serving the other requests meanwhile
        body = await asyncio.to_thread(lambda: json.dumps(final_body(p, out, self.model_name, self.tokenizer)))
        return Response(body, media_type="application/json", headers=headers)

    def _finish(self, gen_tokens: int, t0: float) -> None:
        self.m["generation_tokens"].inc(gen_tokens)
        e2e = time.monotonic() - t0
        self.m["e2e"].observe(e2e)
        if gen_tokens > 1:
            self.m["tpot"].observe(e2e / gen_tokens)

    async def _sse(self, p: Parsed, first, gen, t0: float, deadline: float):
        """One chunk per choice per engine output, each carrying only that output's delta (the engine holds
        back a possible stop string's beginning, so the streamed text equals the non-streamed text). The
        request's deadline covers the whole stream: past it the stream ends with a timeout error."""
        n = p.params.n
        text_sent, tokens_sent = [0] * n, [0] * n
        full_text = [""] * n  # thinking mode splits reasoning from content on the whole text
        calls = [ToolCallStream(p.request_id, i) for i in range(n)] if p.forced_tools else None
        cached = 0
        base = {"id": f"{'chatcmpl' if p.kind == 'chat' else 'cmpl'}-{p.request_id}",
                "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        try:
            if p.kind == "chat":
                for i in range(n):
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            elif p.echo:
                for i in range(n):
                    yield sse({**base, "choices": [{"index": i, "text": p.prompt_text, "logprobs": None,
                                                    "finish_reason": None}]})
            out = first
            while True:
                cached = max(cached, out.num_cached_tokens)
                choices = []  # one chunk per engine output, holding every choice that progressed
                arguments = []  # then the tool calls' arguments, a chunk each (OpenAI: name first, then arguments)
                for c in out.outputs:
                    i = c.index
                    if not c.text and not c.token_ids and not c.finish_reason:
                        continue
                    choice = {"index": i, "finish_reason": c.finish_reason}
                    if p.kind == "chat":
                        choice["delta"] = self._chat_delta(p, full_text[i], c.text, bool(c.finish_reason))
                        choice["logprobs"] = (chat_logprobs(c, self.tokenizer, p.params.logprobs or 0)
                                              if p.chat_logprobs else None)
                        full_text[i] += c.text
                        if calls is not None:   # a forced call: each piece as soon as it is complete
                            content = split_reasoning(full_text[i])[1] if p.thinking else full_text[i]
                            pieces = calls[i].feed(content)
                            if pieces:
                                choice["delta"]["tool_calls"] = pieces
                            if c.finish_reason == "stop" and calls[i].calls:
                                choice["finish_reason"] = "tool_calls"
                        elif c.finish_reason and p.tools:   # the calls, once the block is whole and valid
                            msg, called = chat_message(full_text[i], p.thinking, p, i)
                            if called:
                                choice["delta"]["tool_calls"] = [
                                    {"index": k, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"], "arguments": ""}}
                                    for k, call in enumerate(msg["tool_calls"])]
                                arguments += [{"index": i, "delta": {"tool_calls": [
                                    {"index": k, "function": {"arguments": call["function"]["arguments"]}}]},
                                    "logprobs": None, "finish_reason": None}
                                    for k, call in enumerate(msg["tool_calls"])]
                                if c.finish_reason == "stop":
                                    choice["finish_reason"] = "tool_calls"
                    else:
                        choice["text"] = c.text
                        choice["logprobs"] = (completion_logprobs(c, self.tokenizer, text_sent[i])
                                              if p.params.logprobs is not None else None)
                    text_sent[i] += len(c.text)
                    tokens_sent[i] += len(c.token_ids)
                    choices.append(choice)
                if arguments:   # the finish_reason travels last, after the arguments
                    finishing = [{**ch, "finish_reason": None} for ch in choices]
                    yield sse({**base, "choices": finishing})
                    for part in arguments:
                        yield sse({**base, "choices": [part]})
                    yield sse({**base, "choices": [{"index": ch["index"], "delta": {}, "logprobs": None,
                                                    "finish_reason": ch["finish_reason"]} for ch in choices]})
                elif choices:
                    yield sse({**base, "choices": choices})
                if out.finished:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                out = await asyncio.wait_for(gen.__anext__(), remaining)
            self._finish(sum(tokens_sent), t0)
            if p.include_usage:
                yield sse({**base, "choices": [], "usage": usage_counts(len(p.prompt_ids), sum(tokens_sent), cached)})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            gen.cancel()  # the client disconnected: abort the request and free its cache
            raise
        except (TimeoutError, asyncio.TimeoutError):
            gen.cancel()
            yield sse(APIError(408, f"request {p.request_id} timed out after {self.cfg.request_timeout_s:.0f}s",
                               code="timeout").body())
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            gen.cancel()
            yield sse(self._engine_error(e).body())
            yield "data: [DONE]\n\n"

    @staticmethod
    def _shown(p: Parsed, text: str, finished: bool) -> tuple[str, str]:
        """What a stream has shown of a chat completion's `text`: (reasoning, content). With tools, content stops
        where a tool-calls block starts (and before what may be its beginning, until more text or the end tells);
        a finished block that is not a valid call is shown as text, as in the non-streamed answer."""
        reasoning, content = split_reasoning(text) if p.thinking else ("", text)
        if p.tools:
            at = content.find(CALLS_START)
            if at >= 0:
                if finished and not p.forced_tools and tool_calls_of(content[at + 2:], p.tools, True, "")[0] is None:
                    return reasoning or "", content
                return reasoning or "", content[:at]
            if not finished:
                keep = next((k for k in range(min(len(CALLS_START), len(content)), 0, -1)
                             if content.endswith(CALLS_START[:k])), 0)
                content = content[:len(content) - keep]
        return reasoning or "", content

    @classmethod
    def _chat_delta(cls, p: Parsed, before: str, new: str, finished: bool = False) -> dict:
        if not p.thinking and not p.tools:
            return {"content": new}
        old_r, old_c = cls._shown(p, before, False)
        new_r, new_c = cls._shown(p, before + new, finished)
        d = {}
        if len(new_r) > len(old_r):
            d["reasoning_content"] = new_r[len(old_r):]
        if len(new_c) > len(old_c):
            d["content"] = new_c[len(old_c):]
        return d or {"content": ""}

    # ---- routes -----------------------------------------------------------------------------------------
    @v1.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "v4ray", "max_model_len": self.max_model_len}]}

    @v1.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._run("completions", "completion", request)

    @v1.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._run("chat_completions", "chat", request)

    @v1.post("/tokenize")
    async def tokenize(self, request: Request):
        body = await self._body(request)
        check_fields(body, TOKENIZE_FIELDS)
        if "messages" in body:
            from v4ray.model.chat import ChatFormatError, render_chat
            try:
                ids = self.tokenizer.encode(render_chat(body["messages"]), add_bos=False)
            except ChatFormatError as e:
                raise APIError(400, str(e), param=e.param)
        elif isinstance(body.get("prompt"), str):
            add = body.get("add_special_tokens", True)
            if not isinstance(add, bool):
                raise APIError(400, "'add_special_tokens' must be a boolean", param="add_special_tokens")
            ids = self.tokenizer.encode(body["prompt"], add_bos=add)
        else:
            raise APIError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    @v1.post("/detokenize")
    async def detokenize(self, request: Request):
        body = await self._body(request)
        check_fields(body, DETOKENIZE_FIELDS)
        ids = body.get("tokens")
        vocab = self.tokenizer.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(ids, skip_special_tokens=False)}

    @app.get("/health")
    async def health(self):
        """Liveness of the HTTP front; says nothing about the model (see /ready)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        """200 while the model replica serves, 503 otherwise; the reason goes to the log, not to the caller."""
        try:
            s = await asyncio.wait_for(self.server.stats.remote(), READY_TIMEOUT_S)
            reason = s.get("dead")
        except Exception as e:  # noqa: BLE001
            reason = f"{type(e).__name__}: {e}"
        if reason:
            log.warning("not ready: %s", reason)
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready"}

    @v1.get("/metrics")
    async def metrics(self):
        """Prometheus metrics; behind the API key like /v1 (scrape with a bearer token)."""
        from prometheus_client import generate_latest

        try:
            s = await asyncio.wait_for(self.server.stats.remote(), READY_TIMEOUT_S)
            self.m["queue"].set(s.get("waiting", 0))
            self.m["running"].set(s.get("running", 0))
            if s.get("kv_blocks"):
                self.m["kv"].set(1 - s["kv_free_blocks"] / s["kv_blocks"])
            self.m["preemptions"].set(s.get("preemptions", 0))
            if s.get("prefix_cache"):
                self.m["prefix_hit"].set(s["prefix_cache"].get("hit_rate", 0.0))
            if "expert_imbalance" in s:
                self.m["imbalance"].set(s["expert_imbalance"])
        except Exception as e:  # noqa: BLE001 - still export the request metrics
            log.warning("metrics: server stats unavailable: %s", e)
        return PlainTextResponse(generate_latest(self.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        if not _SETTINGS["docs"]:
            raise APIError(404, "not found (set enable_docs: true to serve the API schema)", code="not_found")
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        if not _SETTINGS["docs"]:
            raise APIError(404, "not found (set enable_docs: true to serve the API docs)", code="not_found")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="v4ray")


app.include_router(v1)
OpenAIIngress = serve.ingress(app)(OpenAIIngress)  # after the /v1 router (with its auth) joined the app
