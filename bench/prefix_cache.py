"""Time to first token of a 2K-token prompt, cold vs with a cached 1,920-token prefix (KVCacheService).

    python bench/prefix_cache.py [--preset v4-tiny] [--prompt-len 2048] [--cached 1920]

Runs a local Ray with the KVCacheService actor; reports the cold/warm TTFT ratio measured in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--cached", type=int, default=1920)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.cached % 128 or args.cached >= args.prompt_len:
        ap.error("--cached must be a multiple of 128 below --prompt-len")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import torch

    from v4ray import LLM, SamplingParams
    from v4ray.model.tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "ckpt", preset=args.preset, dtype="fp32")
    llm = LLM(model=ckpt, dtype="float32", enable_prefix_caching=True, kv_cache_service="v4ray-kv-cache-bench")
    one = SamplingParams(max_tokens=1, temperature=0)
    g = torch.Generator().manual_seed(0)
    cold_t, warm_t = [], []
    for rep in range(args.repeat + 1):
        prompt = torch.randint(16, 272, (args.prompt_len,), generator=g).tolist()
        t = time.perf_counter()
        cold = llm.generate({"prompt_token_ids": prompt}, one)[0]  # miss; stores the first 2,048 tokens' units
        cold_s = time.perf_counter() - t
        variant = prompt[:args.cached] + torch.randint(16, 272, (args.prompt_len - args.cached,), generator=g).tolist()
        llm.generate({"prompt_token_ids": prompt[:args.cached] + [5]}, one)  # the prefix ends at `cached`
        t = time.perf_counter()
        warm = llm.generate({"prompt_token_ids": variant}, one)[0]
        warm_s = time.perf_counter() - t
        assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == args.cached, (cold, warm)
        if rep:  # the first round warms up
            cold_t.append(cold_s), warm_t.append(warm_s)
    cold_ms, warm_ms = 1e3 * min(cold_t), 1e3 * min(warm_t)
    stats = llm.prefix_cache.stats()
    rows = [{"case": "cold", "ttft_ms": round(cold_ms, 1), "cached_tokens": 0},
            {"case": f"cached {args.cached}", "ttft_ms": round(warm_ms, 1), "cached_tokens": args.cached}]
    print(table(rows, ["case", "ttft_ms", "cached_tokens"]))
    print(f"TTFT cold / cached: {cold_ms / warm_ms:.2f}x; service: {stats['bytes_per_cached_token']:.1f} B per cached "
          f"token, {stats['boundary_bytes_per_prefix']:.0f} B boundary state per prefix")
    path = write("prefix_cache", {"preset": args.preset, "prompt_len": args.prompt_len, "cached": args.cached,
                                  "rows": rows, "speedup": round(cold_ms / warm_ms, 2), "service_stats": stats})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
