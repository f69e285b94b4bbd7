"""The KVCacheService actor: exact prefix reuse across LLM instances, budgets, failures (real local Ray)."""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest

from v4ray.actors.kv_cache_service import UNIT_TOKENS, chain_keys, get_or_start_service
from v4ray.model.kv_format import kv_bytes

from conftest import parity_prompt

_names = (f"kvtest-{i}" for i in itertools.count())


@pytest.fixture
def service_name(ray_session):
    name = next(_names)
    yield name
    try:
        ray_session.kill(ray_session.get_actor(name, namespace="v4ray"), no_restart=True)
    except ValueError:
        pass


def _llm(ckpt, name, **kw):
    from v4ray import LLM

    return LLM(model=ckpt, dtype="float32", enable_prefix_caching=True, kv_cache_service=name, **kw)


GREEDY = dict(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
# A warm run starts from the cold run's cache bytes but computes the rest of the prompt in other chunk shapes,
# so fp32 summation orders differ: logprobs agree to ~1e-6, not bitwise.
CACHED_LOGPROB_ATOL = 1e-5


@pytest.mark.parametrize("hit", [128, 256, 384])
def test_cache_hit_equals_cold_run(tiny_ckpt, service_name, hit):
    from v4ray import LLM, SamplingParams

    ckpt = tiny_ckpt("v4-tiny")
    cold = LLM(model=ckpt, dtype="float32")
    warm = _llm(ckpt, service_name)
    base = parity_prompt(hit + 200, seed=hit).tolist()
    seeded = warm.generate({"prompt_token_ids": base[:hit + 5]}, SamplingParams(**GREEDY))[0]
    assert seeded.num_cached_tokens == 0
    for ext in (1, 57, 200):
        prompt = {"prompt_token_ids": base[:hit + ext]}
        a = cold.generate(prompt, SamplingParams(**GREEDY))[0]
        b = warm.generate(prompt, SamplingParams(**GREEDY))[0]
        assert b.num_cached_tokens == hit, f"extension {ext}"
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert la[t].logprob == pytest.approx(lb[t].logprob, abs=CACHED_LOGPROB_ATOL)


def test_two_llms_share_entries_other_models_never_match(tiny_ckpt, service_name):
    from v4ray import SamplingParams

    a = _llm(tiny_ckpt("v4-tiny", seed=1), service_name)
    b = _llm(tiny_ckpt("v4-tiny", seed=1), service_name)           # a second router of the same model
    other = _llm(tiny_ckpt("v4-tiny", seed=2), service_name)        # same config, different weights
    prompt = {"prompt_token_ids": parity_prompt(300, seed=9).tolist()}
    p = SamplingParams(max_tokens=2, temperature=0)
    assert a.generate(prompt, p)[0].num_cached_tokens == 0
    assert b.generate(prompt, p)[0].num_cached_tokens == 256
    assert other.generate(prompt, p)[0].num_cached_tokens == 0
    stats = a.prefix_cache.stats()
    assert stats["hits"] >= 1 and stats["prefixes"] == 2  # one per model


def test_chats_with_the_same_system_prompt_and_tools_share_the_cached_prefix(tiny_ckpt, service_name):
    """Issue 20: the V4 encoding puts the system prompt and the tools section first, so two conversations that
    differ only after them reuse every whole 128-token unit of that prefix; a forced tool call on a cache hit is
    still a valid call."""
    import json

    from v4ray import SamplingParams
    from v4ray.engine.sampling import StructuredOutput
    from v4ray.model.chat import parse_completion, parse_tool_calls, render_chat, tool_call_grammar

    llm = _llm(tiny_ckpt("v4-tiny"), service_name)
    tools = [{"type": "function", "function": {"name": "search", "description": "Search the catalogue",
                                               "parameters": {"type": "object", "required": ["query"], "properties": {
                                                   "query": {"type": "string", "maxLength": 12}}}}}]
    system = {"role": "system", "content": "You are a shop assistant."}
    prompts = [render_chat([system, {"role": "user", "content": q}], tools=tools)
               for q in ("Do you sell red shoes?", "Where is my order 1234?")]
    ids = [llm.tokenizer.encode(p, add_bos=False) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared > 1000                                             # BOS, system text, the ## Tools section
    grammar = StructuredOutput("grammar", tool_call_grammar(tools, parallel=False), param="tools")
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=0, structured=grammar)
    first = llm.generate({"prompt_token_ids": ids[0]}, params)[0]
    second = llm.generate({"prompt_token_ids": ids[1]}, params)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == shared // 128 * 128
    for out in (first, second):
        _, content, block = parse_completion(out.outputs[0].text, thinking=False)
        ((name, args),) = parse_tool_calls(block)
        assert content == "" and name == "search" and isinstance(args["query"], str), json.dumps(args)


def test_bytes_per_cached_token_equal_pool_arithmetic(tiny_ckpt, service_name):
    from v4ray import SamplingParams

    llm = _llm(tiny_ckpt("v4-tiny"), service_name)
    llm.generate({"prompt_token_ids": parity_prompt(520, seed=4).tolist()}, SamplingParams(max_tokens=1))
    s = llm.prefix_cache.stats()
    kb = kv_bytes(llm.config, "fp32")
    assert s["units"] == 4 and s["cached_tokens"] == 512
    assert s["bytes_per_cached_token"] == kb.per_token                # entries only
    assert s["boundary_bytes"] == kb.fixed_per_seq                    # reported separately


def test_budget_is_never_exceeded(ray_session, service_name):
    unit, boundary = 10_000, 3_000
    svc = get_or_start_service(budget_bytes=50_000, name=service_name)
    for i in range(12):
        keys = chain_keys("00" * 32, list(range(i * 1000, i * 1000 + 2 * UNIT_TOKENS)))
        units = {j: np.full(unit, i, dtype=np.uint8) for j in range(2)}
        assert ray_session.get(svc.store.remote(keys, units, np.zeros(boundary, dtype=np.uint8)))
        s = ray_session.get(svc.stats.remote())
        assert s["bytes"] <= 50_000
    assert s["evictions"] == 10 and s["prefixes"] == 2
    # the newest prefix is intact, an evicted one is gone
    assert ray_session.get(svc.lookup.remote(keys)) == 2
    first = chain_keys("00" * 32, list(range(0, 2 * UNIT_TOKENS)))
    assert ray_session.get(svc.lookup.remote(first)) == 0


def test_spill_directory_keeps_evicted_prefixes(ray_session, service_name, tmp_path):
    spill = tmp_path / "spill"
    svc = get_or_start_service(budget_bytes=30_000, spill_dir=str(spill), name=service_name,
                               spill_budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="not 64 lowercase hex"):  # the actor's error, as the caller sees it
        ray_session.get(svc.store.remote(["../escaped"], {0: np.zeros(10, np.uint8)}, np.zeros(1, np.uint8)))
    all_keys = []
    for i in range(4):
        keys = chain_keys("11" * 32, list(range(i * 500, i * 500 + UNIT_TOKENS)))
        all_keys.append(keys)
        ray_session.get(svc.store.remote(keys, {0: np.full(10_000, i, dtype=np.uint8)}, np.zeros(100, np.uint8)))
    s = ray_session.get(svc.stats.remote())
    assert s["spilled"] >= 2 and s["spill_budget_bytes"] == 1 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spill"]      # nothing escaped the spill directory
    assert spill.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in spill.iterdir())
    assert ray_session.get(svc.lookup.remote(all_keys[0])) == 1          # reloaded from disk
    units, _ = ray_session.get(svc.fetch.remote(all_keys[0]))
    assert (units[0] == 0).all() and ray_session.get(svc.stats.remote())["bytes"] <= 30_000


def test_service_restart_loses_only_the_cache(tiny_ckpt, service_name, ray_session):
    from v4ray import SamplingParams

    llm = _llm(tiny_ckpt("v4-tiny"), service_name)
    prompt = {"prompt_token_ids": parity_prompt(200, seed=5).tolist()}
    p = SamplingParams(max_tokens=4, temperature=0)
    first = llm.generate(prompt, p)[0]
    assert llm.generate(prompt, p)[0].num_cached_tokens == 128
    actor = ray_session.get_actor(service_name, namespace="v4ray")
    pid = ray_session.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)                                         # the service dies; Ray restarts it
    again = llm.generate(prompt, p)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids      # recomputed, same answer
    deadline = time.time() + 60
    while llm.generate(prompt, p)[0].num_cached_tokens != 128:           # the restarted service refills
        assert time.time() < deadline


def test_a_stalled_service_costs_one_timeout_then_misses_until_it_answers(ray_session, service_name):
    """A service that stops answering (SIGSTOP: a host cut off looks the same to the caller) costs one call its
    timeout; the calls after it are misses at once while a background probe waits for the service, so a router's
    step is held at most one timeout per outage; once the service answers again the client uses it again."""
    from v4ray.actors.kv_cache_service import PrefixCacheClient

    ray_session.get(get_or_start_service(name=service_name).stats.remote())   # started (that takes > 1 s)
    client = PrefixCacheClient("33" * 32, timeout_s=1.0, name=service_name, retry_after_s=0.5)
    tokens = list(range(UNIT_TOKENS))
    assert client.store(tokens, lambda idx: [np.full(64, 7, dtype=np.uint8) for _ in idx], np.zeros(8, np.uint8))
    assert client.lookup(tokens + [1], UNIT_TOKENS).num_tokens == UNIT_TOKENS
    actor = ray_session.get_actor(service_name, namespace="v4ray")
    pid = ray_session.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        assert client.lookup(tokens + [1], UNIT_TOKENS).num_tokens == 0          # the one timeout
        assert 0.9 <= time.monotonic() - t < 3.0
        t = time.monotonic()
        while time.monotonic() - t < 4.0:                                       # then misses at once, for as long
            s = time.monotonic()                                                # as the service is silent
            assert client.lookup(tokens + [1], UNIT_TOKENS).num_tokens == 0
            assert time.monotonic() - s < 0.1
            time.sleep(0.05)
        assert client.failures == 1 and not client.available
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while not client.available:                                                  # the probe sees it answer
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.lookup(tokens + [1], UNIT_TOKENS).num_tokens == UNIT_TOKENS      # back in use


def test_caller_killed_mid_transfer_leaves_no_partial_entry(ray_session, service_name):
    """A writer dies while storing large prefixes: every entry the service holds is complete."""
    svc = get_or_start_service(budget_bytes=1 << 30, name=service_name)

    @ray_session.remote(num_cpus=0)
    class Writer:
        def run(self, name):
            import ray

            svc = ray.get_actor(name, namespace="v4ray")
            for i in itertools.count():
                keys = chain_keys("22" * 32, list(range(i, i + 3 * UNIT_TOKENS)))
                units = {j: np.full(4 << 20, (i + j) % 251, dtype=np.uint8) for j in range(3)}
                svc.store.remote(keys, units, np.full(1 << 20, i % 251, dtype=np.uint8))

        def pid(self):
            return os.getpid()

    w = Writer.remote()
    pid = ray_session.get(w.pid.remote())
    w.run.remote(service_name)
    deadline = time.time() + 30
    while ray_session.get(svc.stats.remote())["stores"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    s = ray_session.get(svc.stats.remote())
    assert s["stores"] >= 2
    assert s["unit_bytes"] == s["units"] * (4 << 20) and s["boundary_bytes"] == s["prefixes"] * (1 << 20)
    for i in range(s["prefixes"] + 50):
        keys = chain_keys("22" * 32, list(range(i, i + 3 * UNIT_TOKENS)))
        got = ray_session.get(svc.fetch.remote(keys))
        if got is not None:
            units, boundary = got
            assert [int(u[0]) for u in units] == [(i + j) % 251 for j in range(3)] and boundary.nbytes == 1 << 20
