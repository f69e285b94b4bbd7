"""Decode step time against context length: V4's compressed attention vs dense attention of the same size.

    python bench/long_context.py [--contexts 1024,2048,4096,8192,16384,32768] [--batch 1]

The dense baseline is the same tiny model (width, depth, heads, MoE) with every layer attending to all past
tokens (a sliding window as long as the context, no compression). Cache contents do not change the cost of a
step, so each context is set up by sizing the cache rather than prefilling it. Reported as growth ratios
against the shortest context, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed, write  # noqa: E402


def step_time(model, context: int, batch: int, steps: int = 5) -> float:
    from v4ray.model.kv_cache import PagedKVCache, StepBatch

    cache = PagedKVCache(model.cfg, num_blocks=batch * (-(-(context + steps + 1) // 256)), num_slots=batch)
    seqs = [cache.allocate(context + steps + 1) for _ in range(batch)]
    for s in seqs:
        s.num_tokens = context  # as if `context` tokens were prefilled
    tok = torch.full((batch,), 20)

    def one():
        model.step(tok, StepBatch.build(cache, seqs, [1] * batch))

    return timed(one, repeat=steps, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]

    from v4ray.model.config import SWA, load_preset
    from v4ray.model.loader import load_model
    from v4ray.model.tiny import make_tiny

    v4_cfg = load_preset(args.preset)
    dense_cfg = v4_cfg.replace(layer_types=(SWA,) * v4_cfg.num_hidden_layers,
                               compress_ratios=(0,) * v4_cfg.num_hidden_layers,
                               sliding_window=max(contexts) + 8)
    tmp = Path(tempfile.mkdtemp())
    v4 = load_model(make_tiny(tmp / "v4", cfg=v4_cfg, dtype="fp32"), torch.float32)
    dense = load_model(make_tiny(tmp / "dense", cfg=dense_cfg, dtype="fp32"), torch.float32)
    rows = []
    for ctx in contexts:
        rows.append({"context": ctx, "v4_ms": round(1e3 * step_time(v4, ctx, args.batch), 2),
                     "dense_ms": round(1e3 * step_time(dense, ctx, args.batch), 2)})
        print(rows[-1], flush=True)
    for r in rows:
        r["v4_growth"] = round(r["v4_ms"] / rows[0]["v4_ms"], 2)
        r["dense_growth"] = round(r["dense_ms"] / rows[0]["dense_ms"], 2)
    print(table(rows, ["context", "v4_ms", "dense_ms", "v4_growth", "dense_growth"]))
    last = rows[-1]
    print(f"from {contexts[0]} to {contexts[-1]} tokens: V4 step x{last['v4_growth']}, dense x{last['dense_growth']}")
    path = write("long_context", {"preset": args.preset, "batch": args.batch, "rows": rows,
                                  "dense_baseline": "same model, every layer attending to all past tokens"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
