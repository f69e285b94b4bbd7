"""The OpenAI API on a real Ray Serve app bound to 127.0.0.1, driven by the real `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import free_port

SECURE_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(ray_session, tiny_ckpt, tmp_path_factory):
    """One Serve instance with three apps: the main one, a tiny-queue one (/busy), a keyed one (/secure)."""
    from ray import serve

    from v4ray.serve.app import build_app

    ckpt = tiny_ckpt("v4-tiny", confident=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    base = {"model": str(ckpt), "served_model_name": "v4-tiny", "max_num_seqs": 8, "max_model_len": 4096}
    keyfile = tmp_path_factory.mktemp("key") / "key"
    keyfile.write_text(SECURE_KEY)
    serve.run(build_app(base), name="main", route_prefix="/")
    serve.run(build_app({**base, "max_num_seqs": 1, "max_queue_len": 2}), name="busy", route_prefix="/busy")
    serve.run(build_app({**base, "api_key_file": str(keyfile)}), name="secure", route_prefix="/secure")
    yield {"url": f"http://127.0.0.1:{port}", "ckpt": ckpt}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(server):
    from v4ray import LLM

    return LLM(model=server["ckpt"], dtype="float32")


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def test_completion_greedy_equals_offline_llm_and_stream(client, offline):
    from v4ray import SamplingParams

    r = client.completions.create(model="v4-tiny", prompt="The tiny model says", max_tokens=12, temperature=0)
    want = offline.generate("The tiny model says", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(offline.tokenizer.encode("The tiny model says"))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="v4-tiny", prompt="The tiny model says", max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    echo = client.completions.create(model="v4-tiny", prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Echo me")


def test_chat_stream_equals_non_stream_with_usage(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="v4-tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="v4-tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    think = client.chat.completions.create(model="v4-tiny", messages=msgs, max_tokens=6, temperature=0,
                                           extra_body={"chat_template_kwargs": {"thinking": True}})
    assert think.choices[0].message.model_extra.get("reasoning_content") is not None


def test_stop_n_logprobs_and_seeds(client):
    base = client.completions.create(model="v4-tiny", prompt="abc", max_tokens=16, temperature=0).choices[0].text
    stop = next(base[i:i + 2] for i in range(2, len(base) - 1) if base.find(base[i:i + 2]) == i)
    r = client.completions.create(model="v4-tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="v4-tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == r.choices[0].text
    many = client.completions.create(model="v4-tiny", prompt="abc", max_tokens=8, n=3, temperature=1.0, seed=5)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(model="v4-tiny", prompt="abc", max_tokens=8, n=3, temperature=1.0, seed=5)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    lp = client.completions.create(model="v4-tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 4
    chat = client.chat.completions.create(model="v4-tiny", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_32_concurrent_streams_and_disconnects_free_everything(server):
    import aiohttp

    url = server["url"] + "/v1/completions"

    async def one(i: int, session):
        body = {"model": "v4-tiny", "prompt": f"stream {i} " * (1 + i % 5), "max_tokens": 8 + (i * 7) % 40,
                "temperature": 0, "stream": True, "ignore_eos": True}
        quit_early = i < 10
        got, text = 0, ""
        async with session.post(url, json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                got += 1
                if quit_early and got >= 2:
                    return None  # disconnect mid-stream
        return text

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            return await asyncio.gather(*[one(i, session) for i in range(32)])

    results = asyncio.run(main())
    assert all(r is not None for r in results[10:])
    deadline = time.time() + 5
    while time.time() < deadline:
        if _metric(server["url"], "v4ray_num_requests_running") == 0 and \
                _metric(server["url"], "v4ray_kv_cache_usage_ratio") == 0:
            break
        time.sleep(0.2)
    assert _metric(server["url"], "v4ray_num_requests_running") == 0
    assert _metric(server["url"], "v4ray_kv_cache_usage_ratio") == 0
    assert _metric(server["url"], "v4ray_num_requests_waiting") == 0


def _post(url, body=None, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(url, data=data, headers={"content-type": "application/json", **(headers or {})}, timeout=60)


BAD_REQUESTS = [
    ("completions", {"model": "v4-tiny", "prompt": ""}, 400, "prompt"),
    ("completions", {"model": "v4-tiny", "prompt": "x" * 4200}, 400, "prompt"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "n": 1000}, 400, "n"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": "v4-tiny", "prompt": 42}, 400, "prompt"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("completions", {"model": "v4-tiny", "prompt": "hi", "stop": 7}, 400, "stop"),
    ("chat/completions", {"model": "v4-tiny", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "v4-tiny", "messages": "hello"}, 400, "messages"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 30,
                          "logprobs": True}, 400, "top_logprobs"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, 400,
     "tools[0].function.name"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "tool_choice": "required"}, 400, "tool_choice"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     400, "tools[0].function.parameters"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"},
     400, "tool_choice"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "reasoning_effort": "ultra"}, 400, "reasoning_effort"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": []}}},
     400, "response_format.json_schema.schema"),
    # a schema the grammar library cannot enforce (a pattern that is not a regular expression)
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema", "json_schema": {
                              "name": "s", "schema": {"type": "string", "pattern": "(unclosed"}}}}, 400,
     "response_format.json_schema.schema"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_object"}, "ignore_eos": True}, 400, "ignore_eos"),
    ("chat/completions", {"model": "v4-tiny", "messages": [{"role": "user", "content": "x"},
                                                           {"role": "tool", "content": "r"}]}, 400,
     "messages[1].tool_call_id"),
]


def test_tools_and_tool_results_reach_the_v4_prompt(client):
    """A chat with tools renders them into the prompt (the tools section costs prompt tokens), and a conversation
    carrying an assistant tool call and its result is accepted (the official client's message shapes)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model="v4-tiny", messages=ask, max_tokens=4, temperature=0)
    with_tools = client.chat.completions.create(model="v4-tiny", messages=ask, tools=tools, max_tokens=4,
                                                temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 1000   # the ## Tools section: ~1.1 KB
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model="v4-tiny", messages=history, tools=tools, max_tokens=4, temperature=0,
                                       reasoning_effort="high")
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls") and r.usage.prompt_tokens > \
        with_tools.usage.prompt_tokens


WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "required": ["city"], "additionalProperties": False, "properties": {
            "city": {"type": "string", "maxLength": 16},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": {
        "type": "object", "required": ["utc_offset"], "properties": {
            "utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}}}}},
]


def _check_calls(calls):
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_openai_client_tool_call_forced_by_grammar_then_the_result_and_the_answer(client):
    """The official client: tool_choice 'required' makes the tiny model call a tool (the grammar forces the DSML
    block, whatever its random weights prefer), streamed and not (the same seed: the same call); the tool's result
    goes back and the model answers. A named tool_choice calls that tool."""
    ask = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]
    kw = dict(model="v4-tiny", messages=ask, tools=WEATHER_TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=400, temperature=1.0, seed=11)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    _check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1

    calls: dict[int, dict] = {}
    finish, fragments = None, 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert c["name"] is None and not c["arguments"]       # the name comes first
                    c["id"], c["name"] = d.id, d.function.name
                elif d.function.arguments:
                    fragments += 1
                c["arguments"] += d.function.arguments or ""
            assert not ch.delta.content                                    # no DSML leaks into the content
            assert finish is None or not ch.delta.tool_calls
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert fragments >= 2            # streamed as generated: a fragment per parameter, then the closing brace
    (call,) = choice.message.tool_calls
    assert (calls[0]["name"], calls[0]["arguments"]) == (call.function.name, call.function.arguments)

    history = ask + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C; 14:05"}]
    answer = client.chat.completions.create(model="v4-tiny", messages=history, tools=WEATHER_TOOLS,
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens            # the call and its result are in the prompt

    named = client.chat.completions.create(**{**kw, "tool_choice": {"type": "function",
                                                                    "function": {"name": "get_time"}}})
    _check_calls(named.choices[0].message.tool_calls)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]


JSON_SCHEMAS = [  # each bounded (string lengths, numbers, array sizes) so that a random model's output ends
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["age", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"enum": [1, 2, 3]}}, "required": ["color", "size"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "country": {"enum": ["FR", "DE", "US"]}},
                    "required": ["zip", "country"], "additionalProperties": False}},
        "required": ["id", "address"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10},
                                         "y": {"type": "integer", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}}}, "required": ["points"],
     "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "exclusiveMinimum": -50, "maximum": 60},
                                      "unit": {"const": "C"}}, "required": ["temperature", "unit"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "value": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 4}]},
        "extra": {"type": "string", "maxLength": 3}}, "required": ["kind", "value"], "additionalProperties": False},
    {"type": "array", "minItems": 2, "maxItems": 4, "items": {"type": "integer", "minimum": 0, "maximum": 100}},
]


def test_response_format_json_schema_validates_at_temperature_1(client):
    """Ten schemas (nested objects, arrays, enums, required fields, bounded numbers, a pattern, anyOf, null):
    every completion at temperature 1.0 parses and validates against its schema; streamed, the same seed gives
    the same JSON."""
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    def ask(i, schema):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        return client.chat.completions.create(model="v4-tiny", messages=[{"role": "user", "content": "JSON please"}],
                                              response_format=fmt, max_tokens=400, temperature=1.0, seed=i)

    with ThreadPoolExecutor(len(JSON_SCHEMAS)) as pool:
        results = list(pool.map(ask, range(len(JSON_SCHEMAS)), JSON_SCHEMAS))
    for schema, r in zip(JSON_SCHEMAS, results):
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "s4", "schema": JSON_SCHEMAS[4], "strict": True}}
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="v4-tiny", messages=[{"role": "user", "content": "JSON please"}], response_format=fmt,
        max_tokens=400, temperature=1.0, seed=4, stream=True) if ch.choices)
    assert streamed == results[4].choices[0].message.content


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_4xx_naming_the_field(server, path, body, status, param):
    r = _post(f"{server['url']}/v1/{path}", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_bodies_and_oversize(server):
    url = f"{server['url']}/v1/completions"
    for raw, code in ((b"{not json", "invalid_json"), (b"\xff\xfe\x00garbage", "invalid_encoding"), (b"[1, 2]", "invalid_json")):
        r = _post(url, raw=raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == code
    r = _post(url, raw=b'{"model": "v4-tiny", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = _post(url, {"model": "v4-tiny", "prompt": "still serving", "max_tokens": 2})
    assert ok.status_code == 200


def test_overload_gets_429_with_retry_after_and_nothing_is_lost(server):
    import aiohttp

    url = server["url"] + "/busy/v1/completions"

    async def one(session, i):
        body = {"model": "v4-tiny", "prompt": f"burst {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        async with session.post(url, json=body) as resp:
            payload = await resp.json()
            return resp.status, resp.headers.get("Retry-After"), payload

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            return await asyncio.gather(*[one(s, i) for i in range(20)])

    results = asyncio.run(main())
    statuses = [s for s, _, _ in results]
    assert len(results) == 20 and set(statuses) <= {200, 429, 503}
    assert statuses.count(200) >= 3 and statuses.count(429) + statuses.count(503) >= 1
    for status, retry, payload in results:
        if status == 200:
            assert payload["usage"]["completion_tokens"] == 24
        else:
            assert retry is not None and payload["error"]["type"] == "rate_limit_error"


def test_api_key_guards_every_v1_route(server):
    from v4ray.serve.deployments import app

    # the app's whole route table: everything but the two probes needs the key
    routes = [(path, method.upper()) for path, ops in app.openapi()["paths"].items()
              if path not in ("/health", "/ready") for method in ops]
    assert {p for p, _ in routes} >= {"/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics",
                                      "/tokenize", "/detokenize"}
    for path, method in routes:
        url = f"{server['url']}/secure{path}"
        r = requests.request(method, url, json={}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        r = requests.request(method, url, json={}, headers={"Authorization": f"Bearer {SECURE_KEY}"}, timeout=30)
        assert r.status_code != 401, path
    assert requests.get(f"{server['url']}/secure/health", timeout=30).status_code == 200


def test_health_ready_tokenize_metrics(server):
    u = server["url"]
    assert requests.get(u + "/health", timeout=30).json() == {"status": "ok"}
    assert requests.get(u + "/ready", timeout=30).json() == {"status": "ready"}
    tok = _post(u + "/tokenize", {"prompt": "hello"}).json()
    assert tok["count"] == len(tok["tokens"]) == 6
    assert _post(u + "/detokenize", {"tokens": tok["tokens"][1:]}).json()["prompt"] == "hello"
    text = requests.get(u + "/metrics", timeout=30).text
    for name in ("v4ray_requests_total", "v4ray_time_to_first_token_seconds", "v4ray_e2e_request_latency_seconds",
                 "v4ray_time_per_output_token_seconds", "v4ray_num_requests_waiting", "v4ray_kv_cache_usage_ratio",
                 "v4ray_generation_tokens_total"):
        assert name in text


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    seen, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def test_v4ray_serve_command_answers_and_stops_cleanly(tmp_path, tiny_ckpt):
    port = free_port()
    conf = tmp_path / "ray_config.yaml"
    conf.write_text(f"""
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: v4ray
    route_prefix: /
    import_path: v4ray.serve.app:build_app
    args: {{model: v4-tiny-swa, model_cache_dir: {tmp_path / 'cache'}, max_model_len: 512}}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "v4ray.cli", "serve", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        for line in proc.stdout:
            if "serving the OpenAI API" in line:
                break
            assert time.time() < deadline, "v4ray serve did not come up"
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"model": "v4-tiny-swa", "prompt": "curl me", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        family = _descendants(proc.pid)
        assert family  # Ray's processes hang below the command
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    alive = [p for p in family if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not alive, f"processes left behind: {alive}"
