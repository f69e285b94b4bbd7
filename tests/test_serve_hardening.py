"""The OpenAI API under a hostile client and an unlucky operator (issue 14), on a real Serve app on 127.0.0.1:
parsers that never 500, server-side request identity, exposure, a deadline for the whole stream, bounded traffic
under a logprobs-heavy load, a property-based fuzz of every endpoint, and chaos (SIGKILLed router and shard)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import requests

from conftest import free_port
from test_serve import _post

KEY = "hardening-key-456"
MODEL = "v4-tiny"


@pytest.fixture(scope="module")
def apps(ray_session, tiny_ckpt, tmp_path_factory):
    """Three apps: `/` (roomy: 96 sequences), `/timed` (API key, 1 s deadline), `/dist` (1 router + 1 shard)."""
    from ray import serve

    from v4ray.serve.app import build_app

    ckpt = tiny_ckpt("v4-tiny", confident=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    base = {"model": str(ckpt), "served_model_name": MODEL, "max_model_len": 1024}
    keyfile = tmp_path_factory.mktemp("key") / "key"
    keyfile.write_text(KEY)
    serve.run(build_app({**base, "max_num_seqs": 96, "max_queue_len": 64}), name="main", route_prefix="/")
    serve.run(build_app({**base, "max_num_seqs": 4, "request_timeout_s": 1.0, "api_key_file": str(keyfile),
                         "max_output_entries": 50_000}),
              name="timed", route_prefix="/timed")
    serve.run(build_app({**base, "max_num_seqs": 8, "num_routers": 1, "num_expert_shards": 1,
                         "collective_timeout_s": 10.0, "request_timeout_s": 60.0}), name="dist", route_prefix="/dist")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _complete(url: str, prompt: str, max_tokens: int = 4, **kw) -> requests.Response:
    return _post(url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0, "ignore_eos": True, **kw})


def _stream_events(resp) -> list[dict]:
    events = []
    for line in resp.iter_lines():
        line = line.decode()
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


# ---- finding 5: parsers that never 500 -------------------------------------------------------------------------
DEEP = b'{"model": "v4-tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE = [  # (path, raw body, status, param)
    ("/v1/completions", DEEP, 400, None),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"model": "v4-tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}', 400,
     "messages[0].content"),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "seed": 18446744073709551616}', 400, "seed"),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "temperature": 1e999, "min_tokens": 1}', 400,
     "temperature"),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "repetition_penalty": 1e-39, "temperature": 1}', 400,
     "repetition_penalty"),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "best_of": 2}', 400, "best_of"),
    ("/v1/chat/completions", b'{"model": "v4-tiny", "messages": [{"role": "user", "content": "x"}], "foo": 1}', 400,
     "foo"),
    ("/v1/completions", b'{"model": "v4-tiny", "prompt": "hi", "stream_options": {"include_usage": "yes"}}', 400,
     "stream_options.include_usage"),
    ("/detokenize", b'{"tokens": [1, 99999999]}', 400, "tokens"),
    ("/detokenize", b'{"tokens": [1], "extra": true}', 400, "extra"),
]


@pytest.mark.parametrize("path,raw,status,param", HOSTILE, ids=[f"{i}-{h[3]}" for i, h in enumerate(HOSTILE)])
def test_hostile_bodies_get_400_naming_the_field(apps, path, raw, status, param):
    r = _post(apps + path, raw=raw)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_output_cap_names_its_limit(apps):
    """/timed caps n x (logprobs + 1) x max_tokens at 50,000: 8 x 21 x 300 = 50,400 is refused, 8 x 21 x 297 not."""
    url, auth = apps + "/timed/v1/completions", {"Authorization": f"Bearer {KEY}"}
    r = _post(url, {"model": MODEL, "prompt": "hi", "n": 8, "logprobs": 20, "max_tokens": 300}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text[:300]
    assert "max_output_entries (50000)" in r.json()["error"]["message"]
    r = _post(url, {"model": MODEL, "prompt": "hi", "n": 8, "max_tokens": 6300}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _post(url, {"model": MODEL, "prompt": "hi", "n": 8, "logprobs": 20, "max_tokens": 297, "stream": True},
              headers=auth)
    assert r.status_code == 200


# ---- finding 3: the client's x-request-id never keys the engine ------------------------------------------------
def test_a_reused_request_id_never_receives_another_clients_text(apps):
    url = apps + "/v1/completions"
    prompts = {"A": "alpha alpha alpha", "B": "the second client"}
    want = {k: _complete(apps, p, 24).json()["choices"][0]["text"] for k, p in prompts.items()}
    assert want["A"] != want["B"]
    for trial in range(8):
        rid = f"same-id-{trial % 2}"
        body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
        with requests.post(url, json={**body, "prompt": prompts["A"]}, headers={"x-request-id": rid}, stream=True,
                           timeout=60) as a:
            assert a.status_code == 200 and a.headers["x-request-id"] == rid
            next(a.iter_lines())  # A reads a little and disconnects
        with requests.post(url, json={**body, "prompt": prompts["B"]}, headers={"x-request-id": rid}, stream=True,
                           timeout=60) as b:
            text = "".join(e["choices"][0]["text"] for e in _stream_events(b) if e["choices"])
        assert text == want["B"], f"trial {trial}: B got {text!r}"

    async def concurrent():
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async def one(k):
                async with s.post(url, json={"model": MODEL, "prompt": prompts[k], "max_tokens": 24, "temperature": 0,
                                             "ignore_eos": True}, headers={"x-request-id": "dup"}) as r:
                    return r.status, r.headers.get("x-request-id"), (await r.json())["choices"][0]["text"]
            return await asyncio.gather(one("A"), one("B"))

    (sa, ha, ta), (sb, hb, tb) = asyncio.run(concurrent())
    assert (sa, sb, ha, hb) == (200, 200, "dup", "dup") and (ta, tb) == (want["A"], want["B"])


# ---- finding 7: exposure --------------------------------------------------------------------------------------
def test_docs_off_metrics_behind_the_key_and_probes_say_nothing(apps):
    t = apps + "/timed"
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert requests.get(apps + path, timeout=30).status_code == 404, path
    assert requests.get(t + "/metrics", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * len(KEY)}
    assert requests.get(t + "/metrics", headers=wrong, timeout=30).status_code == 401
    odd = {"Authorization": "Bearer caf\xe9".encode("latin-1")}
    assert requests.get(t + "/metrics", headers=odd, timeout=30).status_code == 401
    ok = requests.get(t + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and "v4ray_requests_total" in ok.text
    assert requests.get(t + "/health", timeout=30).json() == {"status": "ok"}
    assert requests.get(t + "/ready", timeout=30).json() == {"status": "ready"}


# ---- finding 9: the deadline covers the whole stream ------------------------------------------------------------
def test_a_stream_ends_with_a_timeout_error_at_its_deadline(apps):
    t0 = time.monotonic()
    with requests.post(apps + "/timed/v1/completions", stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "prompt": "go on", "max_tokens": 1000, "n": 4, "ignore_eos": True,
                             "stream": True}) as r:
        assert r.status_code == 200
        events = _stream_events(r)
    elapsed = time.monotonic() - t0
    assert events[-1].get("error", {}).get("code") == "timeout", events[-1]
    assert elapsed < 10, elapsed
    assert sum(len(c["text"]) for e in events if e.get("choices") for c in e["choices"]) < 4000


# ---- finding 4: output traffic no longer starves other requests ---------------------------------------------
# Streamed per-step deltas cost serialization, ingress, proxy and client CPU on the same 2 cores: measured 1.2-1.6x
# the p99 of the same load not streamed. The cumulative re-sends they replaced grew with the output (a 4-token
# request went from 0.13 s to 1.2-1.8 s, 5x or more of the same load's compute); 2.5 keeps that apart with margin.
TRAFFIC_P99_RATIO = 2.5


def _serve_load():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("serve_load", REPO / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streamed_logprob_traffic_does_not_starve_short_requests(apps):
    """4-token requests beside 8 x n=8 logprobs=20 requests: their p99 with the heavy ones streamed (every step's
    delta travels) stays within TRAFFIC_P99_RATIO of their p99 beside the same requests not streamed (the same
    engine work, the outputs sent once). bench/serve_load.py runs the full 512-token scenario against idle."""
    from ray import serve

    load = _serve_load()
    url = apps + "/v1/completions"
    server = serve.get_deployment_handle("V4Server", app_name="main")
    stats = lambda: server.stats.remote().result(timeout_s=30)  # noqa: E731
    idle = load.percentiles(load.idle_latencies(url))
    runs = {}
    for stream in (False, True):
        res = load.latencies_beside(url, load.heavy_body(8, 20, 256, stream), 8, stats)
        assert res["heavy_tokens"] == [8 * 256] * 8, res["heavy_tokens"]
        runs[stream] = {**load.percentiles(res["short"]), "step_wall_ms": round(res["step_wall_ms"], 1)}
    print(f"\nshort requests: idle {idle}; beside non-streamed {runs[False]}; beside streamed {runs[True]}")
    assert runs[True]["n"] >= 10
    assert runs[True]["p99_ms"] <= TRAFFIC_P99_RATIO * runs[False]["p99_ms"]


# ---- acceptance: property-based fuzz of the HTTP API -----------------------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs", "echo", "stream",
          "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
          "min_tokens", "ignore_eos", "skip_special_tokens", "chat_template_kwargs", "tools", "response_format",
          "best_of", "user", "tokens", "add_special_tokens"]


def _strategies():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([2**63, 2**64, -2**70, 10**30])
               | st.floats(allow_nan=False, allow_infinity=False, width=64)
               | st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e-39, 1e300]) | st.text(max_size=12)
               | st.sampled_from([MODEL, "hi", "\n", "<｜User｜>"]))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "include_usage",
                                                             "thinking", "0", "7"]) | st.text(max_size=4),
                                            inner, max_size=4), max_leaves=12)
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant", "system", "tool",
                                                                        5]),
                                               "content": st.text(max_size=20) | values}), min_size=1, max_size=3)
    body = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)
    good = {"max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "n": st.integers(1, 3),
            "logprobs": st.integers(0, 5), "stop": st.text(min_size=1, max_size=3), "seed": st.integers(0, 2**64 - 1),
            "top_k": st.integers(-1, 50), "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 1),
            "logit_bias": st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=3),
            "stream": st.booleans(), "echo": st.booleans(), "repetition_penalty": st.floats(0.01, 100),
            "presence_penalty": st.floats(-2, 2), "min_tokens": st.integers(0, 2), "ignore_eos": st.booleans(),
            "top_logprobs": st.integers(0, 5), "chat_template_kwargs": st.fixed_dictionaries({"thinking": st.booleans()})}
    def field(k):  # plausible values; the other branches send anything
        return good[k]
    prompt = st.text(min_size=1, max_size=20) | st.lists(st.integers(0, 271), min_size=1, max_size=5)
    turns = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=20)}),
                     min_size=1, max_size=2)
    valid_ish = st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": prompt, "max_tokens": st.integers(1, 6)},
        optional={k: field(k) for k in ("temperature", "n", "logprobs", "stop", "seed", "top_k", "top_p", "min_p",
                                        "logit_bias", "stream", "echo", "repetition_penalty", "presence_penalty",
                                        "min_tokens", "ignore_eos")})
    chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": turns, "max_tokens": st.integers(1, 6)},
                                 optional={k: field(k) for k in ("temperature", "logprobs", "top_logprobs",
                                                                 "chat_template_kwargs", "stream", "n", "seed")})
    raw_tricks = st.sampled_from([b"", b"null", b"[]", b'"x"', b"{", b'{"prompt": "\\ud83d"}', b"NaN",
                                  b'{"model": "v4-tiny", "prompt": "a", "max_tokens": Infinity}',
                                  b'{"model": "v4-tiny", "prompt": "a", "max_tokens": 1.0}',
                                  b'{"model": "v4-tiny", "prompt": "a", "logit_bias": {"\\ud800": 1}}',
                                  b"\xc3\x28", b"[" * 70 + b"]" * 70])
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
    tok = st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=10) | values, "messages": messages,
                                              "add_special_tokens": st.booleans() | values,
                                              "tokens": st.lists(st.integers(-2, 400), max_size=5) | values})
    dumped = lambda b: json.dumps(b).encode()  # noqa: E731
    anything = st.tuples(paths, (body | tok).map(dumped) | raw_tricks)
    return st.one_of(anything, st.tuples(st.just("/v1/completions"), valid_ish.map(dumped)),
                     st.tuples(st.just("/v1/chat/completions"), chat.map(dumped)),
                     st.tuples(st.sampled_from(["/tokenize", "/detokenize"]), tok.map(dumped)))


def test_fuzz_no_input_gets_a_5xx_and_the_server_keeps_answering(apps):
    from hypothesis import HealthCheck, given, settings

    url = apps
    cases = _strategies()
    want = _complete(url, "canary", 3).json()["choices"][0]["text"]
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(max_examples=int(os.environ.get("V4RAY_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(cases)
    def case(path_and_body):
        path, raw = path_and_body
        r = session.post(url + path, data=raw, headers={"content-type": "application/json"}, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, raw[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
            if r.status_code == 400 and err["code"] not in ("invalid_json", "invalid_encoding", "request_too_large"):
                assert isinstance(err["param"], str) and err["param"], (raw[:200], err)
        elif path.endswith("completions") and b'"stream": true' not in raw:
            assert "choices" in r.json()
        canary = session.post(url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "canary", "max_tokens": 3, "temperature": 0,
                                    "ignore_eos": True})
        assert canary.status_code == 200 and canary.json()["choices"][0]["text"] == want

    case()
    print(f"\nfuzz statuses: {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) >= 20 and seen.get(400, 0) >= 20  # both sides of validation were exercised


# ---- finding 2 + acceptance: chaos on a distributed replica ---------------------------------------------------
def _pid_of(role: str) -> int:
    """The pid of the dist app's router or expert shard, as its V4Server reports it."""
    from ray import serve

    ranks = serve.get_deployment_handle("V4Server", app_name="dist").stats.remote().result(timeout_s=30)["ranks"]
    pids = [r["pid"] for r in ranks if r["role"] == role]
    assert len(pids) == 1, ranks
    return pids[0]


def _wait_ready(url: str, status: int, within_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        try:
            if requests.get(url + "/ready", timeout=5).status_code == status:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"/ready did not answer {status} within {within_s}s")


def _recovered(url: str, within_s: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        try:
            r = _complete(url, "are you back", 3)
            if r.status_code == 200:
                return time.monotonic() - t0
            assert r.status_code in (503, 500) or r.status_code == 408, r.text
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the service did not answer 200 again within {within_s}s")


def _stream_and_kill(url: str, class_name: str) -> tuple[dict, float]:
    """Start a long stream, SIGKILL the named rank after a few chunks; returns the last event and how long the
    stream took to end after the kill."""
    body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 900, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        os.kill(_pid_of(class_name), signal.SIGKILL)
        killed = time.monotonic()
        last = None
        for line in lines:
            line = line.decode()
            if line.startswith("data: {"):
                last = json.loads(line[6:])
        return last, time.monotonic() - killed


@pytest.mark.timeout(600)
def test_chaos_killed_router_and_shard_fail_cleanly_and_heal(apps):
    url = apps + "/dist"
    assert _complete(url, "warm up", 3).status_code == 200
    report = {}

    # the router dies while the replica is idle: /ready turns red fast, requests fail fast, Serve heals it
    os.kill(_pid_of("router"), signal.SIGKILL)
    report["idle router: ready 503 after"] = _wait_ready(url, 503, 5.0)
    t0 = time.monotonic()
    r = _complete(url, "anyone there", 3)
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable", r.text
    assert time.monotonic() - t0 < 5
    report["idle router: healed after"] = _recovered(url)

    # a rank dies mid-stream: the stream ends with a clean in-band error within the collective timeout
    for name in ("router", "expert_shard"):
        last, took = _stream_and_kill(url, name)
        assert last is not None and last.get("error", {}).get("code") == "replica_unavailable", last
        assert took < 10.0 + 15.0, took  # collective_timeout_s + probing
        report[f"{name} mid-stream: stream ended after"] = took
        report[f"{name} mid-stream: healed after"] = _recovered(url)
    print("\nchaos: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.items()))
