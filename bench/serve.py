"""TTFT, TPOT and throughput of the OpenAI API over HTTP at concurrency 1..32 (Ray Serve on 127.0.0.1).

    python bench/serve.py [--concurrency 1,2,4,8,16,32] [--prompt-len 64] [--max-tokens 32]

Starts a local Ray and the Serve app of ray_config.yaml's schema with the tiny model, then at each concurrency
keeps that many streaming completion requests in flight for `--rounds` waves. Writes JSON and, when matplotlib
is installed (`pip install -e .[bench]`), a PNG plot beside it.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write  # noqa: E402


async def one(session, url, prompt, max_tokens):
    body = {"model": "v4-tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    first, n = None, 0
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            line = line.decode().strip()
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"] is not None:
                    n += 1
                    first = first or time.perf_counter()
    end = time.perf_counter()
    return first - t0, (end - first) / max(1, max_tokens - 1), end - t0


async def wave(url, c, rounds, prompt_len, max_tokens):
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        t0 = time.perf_counter()
        res = []
        for r in range(rounds):
            res += await asyncio.gather(*[one(s, url, f"{r}-{i} " + "x" * prompt_len, max_tokens) for i in range(c)])
        return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from ray import serve

    from v4ray.serve.app import build_app
    from v4ray.cluster.local_ray import ensure_ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ensure_ray(num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app({"model": "v4-tiny", "model_cache_dir": tempfile.mkdtemp(), "max_num_seqs": 32}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/completions"
    rows = []
    try:
        asyncio.run(wave(url, 2, 1, args.prompt_len, 4))  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            res, wall = asyncio.run(wave(url, c, args.rounds, args.prompt_len, args.max_tokens))
            ttft, tpot, e2e = zip(*res)
            rows.append({"concurrency": c, "ttft_ms_p50": round(1e3 * statistics.median(ttft), 1),
                         "tpot_ms_p50": round(1e3 * statistics.median(tpot), 1),
                         "e2e_ms_p50": round(1e3 * statistics.median(e2e), 1),
                         "tokens_per_s": round(len(res) * args.max_tokens / wall, 1)})
            print(rows[-1], flush=True)
    finally:
        serve.shutdown()
    print(table(rows, ["concurrency", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50", "tokens_per_s"]))
    path = write("serve", {"prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows})
    print(f"wrote {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return
    cs = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(cs, [r["tokens_per_s"] for r in rows], marker="o")
    ax[0].set(xscale="log", xlabel="concurrency", ylabel="generated tokens/s", title="throughput")
    ax[1].plot(cs, [r["ttft_ms_p50"] for r in rows], marker="o", label="TTFT p50")
    ax[1].plot(cs, [r["tpot_ms_p50"] for r in rows], marker="o", label="TPOT p50")
    ax[1].set(xscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve.png", dpi=100)
    print(f"wrote {RESULTS / 'serve.png'}")


if __name__ == "__main__":
    main()
