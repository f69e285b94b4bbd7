"""Several model replicas in one Serve application: prefix-affinity routing, and one KVCacheService they share."""

from __future__ import annotations

import uuid

import pytest
import requests

from conftest import free_port

from v4ray.model.kv_format import PREFIX_UNIT
from v4ray.serve.routing import affinity_key, rank_by_key

MAX_TRIES = 20   # requests until Serve's random routing reaches the other replica: missed with probability 2^-19


def test_affinity_keys_and_rendezvous_ranking():
    assert affinity_key(list(range(PREFIX_UNIT - 1)), 4 * PREFIX_UNIT) is None          # nothing cacheable
    long = list(range(3 * PREFIX_UNIT + 5))
    assert affinity_key(long, 4 * PREFIX_UNIT) == affinity_key(long[:3 * PREFIX_UNIT] + [7], 4 * PREFIX_UNIT)
    assert affinity_key(long, PREFIX_UNIT) == affinity_key(long[:PREFIX_UNIT] + [9] * 300, PREFIX_UNIT)
    assert affinity_key(long, PREFIX_UNIT) != affinity_key([1] + long[1:], PREFIX_UNIT)
    replicas = [f"r{i}" for i in range(4)]
    keys = [affinity_key([k] * PREFIX_UNIT, PREFIX_UNIT) for k in range(200)]
    first = [rank_by_key(k, replicas)[0] for k in keys]
    assert first == [rank_by_key(k, list(reversed(replicas)))[0] for k in keys]          # order-independent
    assert all(first.count(r) > 20 for r in replicas)                                     # spread (50 expected)
    fewer = [rank_by_key(k, replicas[:3])[0] for k in keys]
    assert all(a == b for a, b in zip(first, fewer) if a != "r3")                         # only r3's keys move


@pytest.fixture(scope="module")
def serve_port(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield port
    serve.shutdown()


def _app(tiny_ckpt, port: int, name: str, **args) -> str:
    from ray import serve

    from v4ray.serve.app import build_app

    base = {"model": str(tiny_ckpt("v4-tiny")), "served_model_name": "v4-tiny", "max_num_seqs": 4,
            "max_model_len": 1024, "num_replicas": 2, "enable_prefix_caching": True,
            "kv_cache_service": f"kv-{uuid.uuid4().hex[:8]}"}
    serve.run(build_app({**base, **args}), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}/v1/completions"


def _complete(url: str, prompt: list[int]) -> tuple[str, int]:
    r = requests.post(url, json={"model": "v4-tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0},
                      timeout=120)
    assert r.status_code == 200, r.text[:500]
    details = r.json()["usage"].get("prompt_tokens_details") or {}
    return r.headers["x-v4ray-replica"], details.get("cached_tokens", 0)


def _prompt(seed: int, length: int = 2 * PREFIX_UNIT + 40) -> list[int]:
    return [16 + (seed * 31 + 7 * i) % 256 for i in range(length)]


@pytest.mark.timeout(300)
def test_a_shared_prefix_stays_on_one_replica_and_distinct_ones_spread(tiny_ckpt, serve_port):
    from ray import serve

    url = _app(tiny_ckpt, serve_port, "affine")
    try:
        shared = _prompt(0)
        seen = [_complete(url, shared[:2 * PREFIX_UNIT] + [16 + t]) for t in range(8)]   # one key, other tails
        assert len({replica for replica, _ in seen}) == 1, seen
        assert all(cached >= 2 * PREFIX_UNIT for _, cached in seen[1:]), seen           # stored by the first
        spread = {_complete(url, _prompt(seed, PREFIX_UNIT + 3))[0] for seed in range(1, 17)}
        assert len(spread) == 2, spread                                                  # both serve
    finally:
        serve.delete("affine")


@pytest.mark.timeout(300)
def test_a_prefix_stored_through_one_replica_is_a_hit_through_the_other(tiny_ckpt, serve_port):
    """Affinity off (Serve's own routing picks between two idle replicas at random): the first request that lands
    on the other replica already finds the prefix, which only the first replica computed and stored."""
    from ray import serve

    url = _app(tiny_ckpt, serve_port, "shared", prefix_affinity_tokens=0)
    try:
        prompt = _prompt(99)
        first, cached = _complete(url, prompt)
        assert cached == 0
        for _ in range(MAX_TRIES):
            replica, cached = _complete(url, prompt)
            if replica != first:
                break
        assert replica != first, "Serve never routed to the second replica"
        assert cached >= 2 * PREFIX_UNIT
    finally:
        serve.delete("shared")
