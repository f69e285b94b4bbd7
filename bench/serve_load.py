"""Short requests beside logprob-heavy ones (issue 14's load scenario), through HTTP on Ray Serve (127.0.0.1).

    python bench/serve_load.py [--heavy 8] [--n 8] [--logprobs 20] [--max-tokens 512] [--max-step-rows 0,24]

Phases, one run: 4-token requests on an idle server; beside `--heavy` requests of n x max_tokens with logprobs
that are not streamed (the engine does all the work, the outputs travel once at the end); and beside the same
requests streamed (every step's delta travels to the client). p50/p99 of the short requests per phase, the
engine's step time, and the ratios: streamed/non-streamed isolates what the output traffic costs, loaded/idle
what the larger batch costs. Each phase runs once per `--max-step-rows` value (the engine's fair-step bound: 0 runs
every sequence every step; a bound makes whole requests take turns, narrow ones first), each on a fresh deployment.
Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHORT = {"model": "v4-tiny", "prompt": "short one", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def heavy_body(n: int, logprobs: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": "v4-tiny", "prompt": "heavy request", "max_tokens": max_tokens, "n": n, "logprobs": logprobs,
            "temperature": 1.0, "seed": 3, "ignore_eos": True, "stream": stream}
    return {**body, "stream_options": {"include_usage": True}} if stream else body


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": round(1e3 * statistics.median(xs), 1),
            "p99_ms": round(1e3 * xs[max(0, int(len(xs) * 0.99) - 1)], 1)}


def short_latency(url: str, starts: list | None = None) -> float:
    import requests

    t0 = time.monotonic()
    if starts is not None:
        starts.append(t0)
    r = requests.post(url, json=SHORT, timeout=120)
    assert r.status_code == 200, r.text[:300]
    return time.monotonic() - t0


def idle_latencies(url: str, count: int = 20) -> list[float]:
    short_latency(url)
    return [short_latency(url) for _ in range(count)]


def latencies_beside(url: str, heavy: dict, num_heavy: int, stats=None) -> dict:
    """Send `num_heavy` copies of `heavy` at once and time one short request after another until they finish.
    Returns the short latencies, each heavy request's completion tokens, the wall time and, when `stats` (a
    callable returning the server's stats) is given, the engine's wall and CPU ms per step meanwhile."""
    import aiohttp

    done: list[float] = []
    starts: list[float] = []

    async def one(session) -> int:
        try:
            return await _one(session)
        finally:
            done.append(time.monotonic())

    async def _one(session) -> int:
        async with session.post(url, json=heavy) as r:
            assert r.status == 200, (await r.text())[:300]
            if not heavy["stream"]:
                return json.loads(await r.read())["usage"]["completion_tokens"]
            tokens = 0
            async for line in r.content:  # every byte is read; only the usage chunk is parsed
                assert not line.startswith(b'data: {"error"'), line[:300]
                if line.startswith(b"data: {") and b'"usage"' in line[-200:]:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return tokens

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            task = asyncio.gather(*[one(session) for _ in range(num_heavy)])
            await asyncio.sleep(1.0)  # the heavy requests are decoding
            short = []
            while not task.done():
                short.append(await asyncio.to_thread(short_latency, url, starts))
            return short, await task

    s0 = stats() if stats else None
    t0 = time.monotonic()
    short, tokens = asyncio.run(main())
    out = {"short": short, "heavy_tokens": tokens, "wall_s": time.monotonic() - t0,
           # the slowest short requests: when they started and how long they took, against the heavy ones' ends
           "slowest": [(round(starts[i] - t0, 2), round(short[i], 3)) for i in sorted(range(len(short)),
                                                                                key=short.__getitem__)[-4:]],
           "heavy_done_s": [round(d - t0, 2) for d in sorted(done)]}
    if stats:
        s1 = stats()
        steps = max(1, s1["engine_steps"] - s0["engine_steps"])
        out["step_wall_ms"] = 1e3 * (s1["engine_step_wall_s"] - s0["engine_step_wall_s"]) / steps
        out["step_cpu_ms"] = 1e3 * (s1["engine_step_cpu_s"] - s0["engine_step_cpu_s"]) / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heavy", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--logprobs", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-step-rows", default="0,24", help="comma-separated: one deployment per value")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import table, write

    from ray import serve

    from v4ray.serve.app import build_app
    from v4ray.cluster.local_ray import ensure_ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ensure_ray(num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    url = f"http://127.0.0.1:{port}/v1/completions"
    models = tempfile.mkdtemp()
    rows, ratios = [], {}
    try:
        for bound in [int(x) for x in args.max_step_rows.split(",")]:
            serve.run(build_app({"model": "v4-tiny", "model_cache_dir": models, "max_model_len": 1024,
                                 "max_num_seqs": args.heavy * args.n + 32, "max_step_rows": bound}),
                      name="bench", route_prefix="/")
            server = serve.get_deployment_handle("V4Server", app_name="bench")
            stats = lambda: server.stats.remote().result(timeout_s=60)  # noqa: E731
            idle = {"max_step_rows": bound, "phase": "idle", **percentiles(idle_latencies(url))}
            mine = [idle]
            for stream in (False, True):
                res = latencies_beside(url, heavy_body(args.n, args.logprobs, args.max_tokens, stream), args.heavy,
                                       stats)
                assert res["heavy_tokens"] == [args.n * args.max_tokens] * args.heavy, res["heavy_tokens"]
                mine.append({"max_step_rows": bound, "phase": "beside streamed" if stream else "beside non-streamed",
                             **percentiles(res["short"]), "step_wall_ms": round(res["step_wall_ms"], 1),
                             "step_cpu_ms": round(res["step_cpu_ms"], 1), "wall_s": round(res["wall_s"], 1)})
                print("slowest short (start s, latency s):", res["slowest"], "heavy done at", res["heavy_done_s"])
                print(mine[-1], flush=True)
            for r in mine:
                r["p99_vs_idle_p99"] = round(r["p99_ms"] / idle["p99_ms"], 2)
            ratios[f"max_step_rows={bound}"] = {
                "streamed_p99_vs_non_streamed_p99": round(mine[2]["p99_ms"] / mine[1]["p99_ms"], 2),
                "non_streamed_p99_vs_idle_p99": mine[1]["p99_vs_idle_p99"],
                "streamed_p99_vs_idle_p99": mine[2]["p99_vs_idle_p99"]}
            rows += mine
            serve.delete("bench")
    finally:
        serve.shutdown()
    if len(rows) == 6:   # the heavy requests' own cost of the bound: their wall time, bounded vs not
        ratios["heavy_wall_bounded_vs_unbounded"] = {
            phase: round(rows[3 + i]["wall_s"] / rows[i]["wall_s"], 2)
            for i, phase in [(1, "non-streamed"), (2, "streamed")]}
    print(table(rows, ["max_step_rows", "phase", "n", "p50_ms", "p99_ms", "p99_vs_idle_p99", "step_wall_ms",
                       "step_cpu_ms", "wall_s"]))
    print(json.dumps(ratios, indent=1))
    path = write("serve_load", {"args": vars(args), "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
