"""Decode step time against context length: V4's compressed attention vs dense attention of the same size.

    python bench/long_context.py [--contexts 1024,2048,4096,8192,16384,32768] [--batch 1]
                                 [--decode-steps eager,compiled] [--dense-step compiled] [--rounds 5]

The dense baseline is the same tiny model (width, depth, heads, MoE) with every layer attending to all past
tokens (no compression, a sliding window as long as each context: its window ring then holds exactly the past,
as a dense cache would). It is timed as V4's compiled step is (`--dense-step compiled`, the default: its window
is a constant of the graph, so every context compiles its own graph for the batch, about a minute each) or eagerly: the eager
step's fixed cost (~12 ms here, against ~4 ms compiled) hides most of the growth at the short contexts. Cache
contents do not change the cost of a step, so each context is set up by giving the sequences that many cached
tokens rather than prefilling them.
Each decode step runs eagerly (`StepBatch`) and as the compiled fixed-shape step (engine/graphs.py; one cache
sized for the longest context serves every context, so one compile covers them all). Every context is timed in
each of `--rounds` passes (the best of 20 steps), and each cell reports its best pass: the contexts alternate, so a
slow spell of the host does not fall on one end of a ratio. Reported as growth ratios against the shortest
context, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed, write  # noqa: E402


def step_timer(model, max_context: int, batch: int, steps: int = 20, compiled: bool = True, warm_up: bool = True):
    """-> time(context, mode): seconds of one decode step of `batch` sequences with `context` cached tokens.
    warm_up False: the compiled step compiles on the first (untimed) warm-up step, only the graph of this batch."""
    from v4ray.engine.graphs import DecodeGraphs
    from v4ray.model.kv_cache import PagedKVCache, StepBatch

    per_seq = -(-(max_context + 2 * steps + 2) // 256)
    cache = PagedKVCache(model.cfg, num_blocks=batch * per_seq, num_slots=batch)
    graphs = DecodeGraphs(model, cache, batch, per_seq) if compiled else None
    if graphs is not None and warm_up:
        graphs.warm_up()
    tok = [20] * batch

    def time_at(context: int, mode: str) -> float:
        seqs = [cache.allocate(context + 2 * steps + 2) for _ in range(batch)]
        for s in seqs:
            s.num_tokens = context  # as if `context` tokens were prefilled

        def one():
            if mode == "eager":
                model.step(torch.tensor(tok), StepBatch.build(cache, seqs, [1] * batch))
            else:
                graphs.run(seqs, tok)
                for s in seqs:
                    s.num_tokens += 1

        try:
            return timed(one, repeat=steps, warmup=3)
        finally:
            for s in seqs:
                cache.free(s)

    return time_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode-steps", default="eager,compiled")
    ap.add_argument("--dense-step", default="compiled", choices=["compiled", "eager"])
    ap.add_argument("--rounds", type=int, default=5, help="passes over all contexts; each cell: its best")
    args = ap.parse_args()
    modes = args.decode_steps.split(",")
    # every dense context is another model (its window a graph constant) and compiles its own graphs: more than
    # dynamo's default of 8 per code object
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    contexts = [int(c) for c in args.contexts.split(",")]

    from v4ray.model.config import SWA, load_preset
    from v4ray.model.loader import load_model
    from v4ray.model.tiny import make_tiny

    v4_cfg = load_preset(args.preset)
    dense_cfg = v4_cfg.replace(layer_types=(SWA,) * v4_cfg.num_hidden_layers,
                               compress_ratios=(0,) * v4_cfg.num_hidden_layers)
    tmp = Path(tempfile.mkdtemp())
    v4 = load_model(make_tiny(tmp / "v4", cfg=v4_cfg, dtype="fp32"), torch.float32)
    dense_ckpt = make_tiny(tmp / "dense", cfg=dense_cfg, dtype="fp32")
    v4_time = step_timer(v4, max(contexts), args.batch, compiled="compiled" in modes)
    dense_time = {}
    for ctx in contexts:   # each context's dense model compiles on its first (untimed) steps
        window = ctx + 16  # the past of every timed step
        dense = load_model(dense_ckpt, torch.float32, cfg=dense_cfg.replace(sliding_window=window))
        dense_time[ctx] = step_timer(dense, ctx, args.batch, compiled=args.dense_step == "compiled", warm_up=False)
        dense_time[ctx](ctx, args.dense_step)
    # Rounds over all contexts in turn, each cell's best step over them: a slow spell of a shared host (seconds
    # long on the CI's VMs) lands on every context of a round alike instead of on one end of the ratio.
    cols = [f"v4_{mode}_ms" for mode in modes] + ["dense_ms"]
    samples = {(ctx, c): [] for ctx in contexts for c in cols}
    for r in range(args.rounds):
        for ctx in contexts:
            for mode in modes:
                samples[ctx, f"v4_{mode}_ms"].append(1e3 * v4_time(ctx, mode))
            samples[ctx, "dense_ms"].append(1e3 * dense_time[ctx](ctx, args.dense_step))
            print(f"round {r}: {ctx} tokens:", {c: round(samples[ctx, c][-1], 2) for c in cols}, flush=True)
    rows = [{"context": ctx, **{c: round(min(samples[ctx, c]), 2) for c in cols}} for ctx in contexts]
    for r in rows:
        for c in cols:
            r[c.replace("_ms", "_growth")] = round(r[c] / rows[0][c], 2)
    print(table(rows, ["context", *cols, *(c.replace("_ms", "_growth") for c in cols)]))
    last = rows[-1]
    print(f"from {contexts[0]} to {contexts[-1]} tokens: "
          + ", ".join(f"{c[:-3]} x{last[c.replace('_ms', '_growth')]}" for c in cols))
    path = write("long_context", {"preset": args.preset, "batch": args.batch, "rounds": args.rounds, "rows": rows,
                                  "dense_baseline": f"same model, every layer attending to all past tokens ({args.dense_step})"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
