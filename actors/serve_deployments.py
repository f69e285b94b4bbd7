"""Ray Serve deployments: `V4Server` owns one model replica and its engine; `OpenAIIngress` speaks the OpenAI API.

V4Server runs the engine in its own process (num_expert_shards = 0) or drives a Router/ExpertShard replica placed
in the deployment's own placement group. OpenAIIngress (FastAPI) validates requests, counts and limits them,
streams Server-Sent Events, maps failures to OpenAI-shaped errors and exports Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from v4ray.model.tokenizer import V4Tokenizer

from v4ray.model.chat import split_reasoning

from .openai_protocol import (APIError, Parsed, chat_logprobs, completion_logprobs, final_body,
                              parse_json, parse_request, sse, usage)

log = logging.getLogger("v4ray.serve")


class V4Server:
    """One model replica behind an AsyncEngine (bounded queue, streaming, abort on cancel)."""

    def __init__(self, config: dict):
        import torch

        from v4ray.cluster.config import ServeConfig
        from v4ray.cluster.engine import AsyncEngine
        from v4ray.model.engine_core import EngineCore
        from v4ray.model.loader import load_model
        from v4ray.model.runner import ModelRunner

        self.cfg = cfg = ServeConfig(**config)
        path = cfg.resolve_model()
        dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        tokenizer = V4Tokenizer.from_dir(path)
        prefix = None
        if cfg.enable_prefix_caching:
            from .kv_cache_service import PrefixCacheClient, model_identity, root_key
            fmt = "fp32" if cfg.dtype == "float32" else "bf16"
            prefix = {"root": root_key(model_identity(path), f"kv={fmt}|unit=128")}
        self.replica = None
        if cfg.num_expert_shards == 0:
            runner = ModelRunner(load_model(path, dtype), cfg.kv_cache_bytes, cfg.max_num_seqs,
                                 prefix_cache=PrefixCacheClient(**prefix) if prefix else None)
            engine = EngineCore(runner, tokenizer, cfg.max_model_len, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                prefix_caching=prefix is not None)
            self._local = engine
        else:
            from v4ray.cluster.replica import Replica, ReplicaConfig, ReplicaEngine
            self.replica = Replica(ReplicaConfig(
                model=str(path), num_routers=cfg.num_routers, num_expert_shards=cfg.num_expert_shards,
                dtype=cfg.dtype, kv_cache_bytes=cfg.kv_cache_bytes, max_num_seqs=cfg.max_num_seqs,
                max_model_len=cfg.max_model_len, max_num_batched_tokens=cfg.max_num_batched_tokens,
                prefix_cache=prefix, collective_timeout_s=cfg.collective_timeout_s)).start()
            engine = ReplicaEngine(self.replica)
            self._local = None
        self.engine = AsyncEngine(engine, max_pending=cfg.max_num_seqs * cfg.num_routers + cfg.max_queue_len)
        self.started = time.time()

    async def generate(self, prompt_ids: list[int], params, request_id: str, prompt: str | None = None):
        async for out in self.engine.generate(prompt_ids, params, request_id, prompt):
            yield out

    def stats(self) -> dict:
        s = {"requests_in_flight": self.engine.num_requests, "dead": self.engine.dead}
        if self._local is not None:
            s.update(self._local.stats())
            pc = self._local.runner.prefix_cache
            s["prefix_cache"] = pc.stats() if pc is not None else None
        elif self.replica is not None and not self.replica.failed:
            rs = self.replica.stats()
            eng = [r["engine"] for r in rs["routers"]]
            s.update({k: sum(e[k] for e in eng) for k in ("waiting", "running", "kv_blocks", "kv_free_blocks",
                                                        "preemptions")})
            s["expert_imbalance"] = max(rs["shard_imbalance"] or [0.0])
        return s

    def check_health(self) -> None:
        if self.engine.dead:
            raise RuntimeError(self.engine.dead)

    def __del__(self):
        try:
            self.engine.shutdown()
            if self.replica is not None:
                self.replica.shutdown()
        except Exception:  # noqa: BLE001
            pass


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


app = FastAPI(title="v4ray", description="OpenAI-compatible API for DeepSeek-V4 on Ray")


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


_API_KEY: dict[str, str | None] = {"key": None}  # set by the ingress replica from its config


def _auth(request: Request) -> None:
    key = _API_KEY["key"]
    if key and request.headers.get("authorization", "") != f"Bearer {key}":
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       type_="authentication_error", code="invalid_api_key")


v1 = APIRouter(dependencies=[Depends(_auth)])


class OpenAIIngress:
    def __init__(self, server, config: dict):
        from v4ray.cluster.config import ServeConfig

        self.server = server
        self.cfg = cfg = ServeConfig(**config)
        path = cfg.resolve_model()
        self.tokenizer = V4Tokenizer.from_dir(path)
        self.model_name = cfg.served_model_name or cfg.model.rstrip("/").split("/")[-1]
        _API_KEY["key"] = cfg.api_key()
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
        from v4ray.cluster.engine import EngineDeadError, QueueFullError

        cause = getattr(e, "cause", None) or e
        if isinstance(cause, QueueFullError) or isinstance(e, QueueFullError):
            return APIError(429, f"server busy: {cause}", type_="rate_limit_error", code="queue_full",
                            headers={"Retry-After": "1"})
        if isinstance(cause, EngineDeadError) or isinstance(e, EngineDeadError):
            return APIError(503, f"the model replica is unavailable: {cause}", type_="server_error",
                            code="replica_unavailable", headers={"Retry-After": "5"})
        if isinstance(cause, ValueError):
            return APIError(400, str(cause))
        return APIError(500, f"internal error: {type(cause).__name__}: {cause}", type_="server_error")

    async def _run(self, endpoint: str, kind: str, request: Request):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:24]
        try:
            p = parse_request(kind, await self._body(request), self.tokenizer, self.cfg.max_model_len,
                              self.cfg.max_n, self.model_name)
        except APIError as e:
            self._count(endpoint, e.status)
            raise
        p.request_id = rid
        log.info("request %s %s: %d prompt tokens, max_tokens %d, n %d, stream %s", rid, endpoint,
                 len(p.prompt_ids), p.params.max_tokens, p.params.n, p.stream)
        gen = self.server.options(stream=True).generate.remote(p.prompt_ids, p.params, rid, p.prompt_text)
        t0 = time.monotonic()
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()
            self._count(endpoint, 408)
            raise APIError(408, f"request {rid} timed out after {self.cfg.request_timeout_s:.0f}s",
                           code="timeout")
        except Exception as e:  # noqa: BLE001
            gen.cancel()
            err = self._engine_error(e)
            self._count(endpoint, err.status)
            raise err
        self.m["ttft"].observe(time.monotonic() - t0)
        self.m["prompt_tokens"].inc(len(p.prompt_ids))
        headers = {"x-request-id": rid}
        if p.stream:
            self._count(endpoint, 200)
            return StreamingResponse(self._sse(p, first, gen, t0), media_type="text/event-stream", headers=headers)
        out = first
        try:
            async with asyncio.timeout(max(0.0, self.cfg.request_timeout_s - (time.monotonic() - t0))):
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
        self._finish(out, t0)
        self._count(endpoint, 200)
        return JSONResponse(final_body(p, out, self.model_name, self.tokenizer), headers=headers)

    def _finish(self, out, t0: float) -> None:
        gen_tokens = sum(len(c.token_ids) for c in out.outputs)
        self.m["generation_tokens"].inc(gen_tokens)
        e2e = time.monotonic() - t0
        self.m["e2e"].observe(e2e)
        if gen_tokens > 1:
            self.m["tpot"].observe(e2e / gen_tokens)

    async def _sse(self, p: Parsed, first, gen, t0: float):
        """Chunks with each choice's new text; a stop string's possible beginning is held back until it is
        known not to be one, so streamed text equals the non-streamed text."""
        n = p.params.n
        hold = max((len(s) for s in p.params.stop or []), default=1) - 1
        sent_text, sent_tok, done = [0] * n, [0] * n, [False] * n
        base = {"id": f"{'chatcmpl' if p.kind == 'chat' else 'cmpl'}-{p.request_id}",
                "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        out = first
        try:
            if p.kind == "chat":
                for i in range(n):
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            elif p.echo:
                for i in range(n):
                    yield sse({**base, "choices": [{"index": i, "text": p.prompt_text, "logprobs": None,
                                                    "finish_reason": None}]})
            item = first
            while True:
                out = item
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    text = c.text if c.finish_reason else c.text[:max(sent_text[i], len(c.text) - hold)]
                    delta, new_tokens = text[sent_text[i]:], c.token_ids[sent_tok[i]:]
                    if not delta and not c.finish_reason:
                        continue
                    choice = {"index": i, "finish_reason": c.finish_reason}
                    if p.kind == "chat":
                        choice["delta"] = self._chat_delta(p, c.text[:len(text)], sent_text[i])
                        choice["logprobs"] = (chat_logprobs(_slice(c, sent_tok[i]), self.tokenizer,
                                                            p.params.logprobs or 0) if p.chat_logprobs else None)
                    else:
                        choice["text"] = delta
                        choice["logprobs"] = (completion_logprobs(_slice(c, sent_tok[i]), self.tokenizer)
                                              if p.params.logprobs is not None else None)
                    sent_text[i], sent_tok[i] = len(text), sent_tok[i] + len(new_tokens)
                    done[i] = c.finish_reason is not None
                    yield sse({**base, "choices": [choice]})
                if out.finished:
                    break
                item = await gen.__anext__()
            self._finish(out, t0)
            if p.include_usage:
                yield sse({**base, "choices": [], "usage": usage(out)})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            gen.cancel()  # the client disconnected: abort the request and free its cache
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            gen.cancel()
            yield sse(self._engine_error(e).body())
            yield "data: [DONE]\n\n"

    def _chat_delta(self, p: Parsed, text: str, sent: int) -> dict:
        if not p.thinking:
            return {"content": text[sent:]}
        old_r, old_c = split_reasoning(text[:sent])
        new_r, new_c = split_reasoning(text)
        d = {}
        if len(new_r or "") > len(old_r or ""):
            d["reasoning_content"] = (new_r or "")[len(old_r or ""):]
        if len(new_c) > len(old_c):
            d["content"] = new_c[len(old_c):]
        return d or {"content": ""}

    # ---- routes -----------------------------------------------------------------------------------------
    @v1.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "v4ray", "max_model_len": self.cfg.max_model_len}]}

    @v1.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._run("completions", "completion", request)

    @v1.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._run("chat_completions", "chat", request)

    @v1.post("/tokenize")
    async def tokenize(self, request: Request):
        body = await self._body(request)
        if "messages" in body:
            from v4ray.model.chat import ChatFormatError, render_chat
            try:
                ids = self.tokenizer.encode(render_chat(body["messages"]), add_bos=False)
            except ChatFormatError as e:
                raise APIError(400, str(e), param=e.param)
        elif isinstance(body.get("prompt"), str):
            ids = self.tokenizer.encode(body["prompt"], add_bos=bool(body.get("add_special_tokens", True)))
        else:
            raise APIError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.cfg.max_model_len}

    @v1.post("/detokenize")
    async def detokenize(self, request: Request):
        body = await self._body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        return {"prompt": self.tokenizer.decode(ids, skip_special_tokens=False)}

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        try:
            s = await asyncio.wait_for(self.server.stats.remote(), 10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "not ready", "reason": str(e)}, status_code=503)
        if s.get("dead"):
            return JSONResponse({"status": "not ready", "reason": s["dead"]}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics(self):
        from prometheus_client import generate_latest

        try:
            s = await asyncio.wait_for(self.server.stats.remote(), 10)
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


app.include_router(v1)
OpenAIIngress = serve.ingress(app)(OpenAIIngress)  # after the /v1 router (with its auth) joined the app


def _slice(c, start: int):
    """A copy of completion `c` holding only tokens from `start` (for per-chunk logprobs)."""
    from dataclasses import replace

    return replace(c, token_ids=c.token_ids[start:], logprobs=c.logprobs[start:] if c.logprobs else c.logprobs)
