"""Sampling one engine step: the per-row chain (each row its own device ops) against the batched one (issue 17).

    PYTHONPATH=... python bench/sampler.py [--vocab 129280] [--rows 32 64] [--repeats 5]

For S rows of V logits on the CPU, one `SamplingBatch.run` (tokens chosen and read back), best of `repeats`:
  per-row: what the engine did before issue 17 — `Penalties.apply` and `sampling_probs` per row, then `draw`;
  batched: `SamplingBatch.sample` per row — the rows shaped together (`Penalties.apply_rows`), one `batch_probs`
           chain on [S, V], one draw.
Kinds: greedy (plain argmax rows: the same path in both, a baseline), sampled (temperature 0.8, top_k 50,
top_p 0.9, seeded), penalised (sampled + repetition / frequency / presence penalties and a logit_bias).

Measured 2026-12-01 on the 2-core box (torch 2.13 CPU, 2 threads, quiet), V=129280, best of 5 (ms, per-row ->
batched): 32 rows greedy 4.8 -> 4.7 (1.03x), sampled 160.6 -> 151.6 (1.06x), penalised 184.7 -> 179.0 (1.03x);
64 rows greedy 13.2 -> 11.3 (1.17x), sampled 330.8 -> 313.1 (1.06x), penalised 400.3 -> 388.8 (1.03x).
On the CPU the two paths do the same arithmetic and each per-row op over 129,280 logits is already large enough
that dispatch overhead is a few percent: of a 32-row sampled step, the exponential fill of `draw` (one per row,
each from its own generator, as torch.multinomial does) is ~65 ms and the top-p sort ~30 ms (after top-k), both
needed for bit-identical tokens. What batching removes is the ~15 device ops per row (S x 15 kernel launches on
a GPU, ~15 in all now), which this CPU measurement cannot show. (Under a concurrent CI load the per-row path
measured 2.5-7x slower than batched; those numbers were contention, not the method.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from v4ray.engine.sampler import Penalties, SamplingBatch, make_generator, sampling_probs, sampling_row
from v4ray.engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed, write  # noqa: E402

KINDS = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.8, top_k=50, top_p=0.9),
    "penalised": dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.3,
                      presence_penalty=0.2, logit_bias={17: 2.0, 99: -1.0}),
}


def setup(kind: str, rows: int, vocab: int):
    params = [SamplingParams(seed=i, **KINDS[kind]) for i in range(rows)]
    prompt = list(range(0, min(4000, vocab), 7))
    penalties = [Penalties.of(p, prompt, vocab, 1, torch.device("cpu")) for p in params]
    for pen in penalties:
        if pen is not None and pen.counts is not None:
            pen.count(torch.randint(0, vocab, (200,), generator=torch.Generator().manual_seed(0)))
    return params, [sampling_row(p, vocab) for p in params], penalties


def per_row(logits, params, rows, penalties, generators):
    batch = SamplingBatch(logits)
    for row, (p, pen, g) in enumerate(zip(params, penalties, generators)):
        if p.greedy and pen is None:
            continue
        shaped = logits[row] if pen is None else pen.apply(logits[row], 5)
        if pen is not None and pen.counts is not None:
            batch.count(row, pen)
        if p.greedy:
            batch.greedy(row, shaped)
        else:
            batch.draw(row, sampling_probs(shaped, p), g)
    return batch.run()


def batched(logits, params, rows, penalties, generators):
    batch = SamplingBatch(logits)
    for row, (p, r, pen, g) in enumerate(zip(params, rows, penalties, generators)):
        if p.greedy and pen is None:
            continue
        batch.sample(row, p, r, pen, 5, g)
    return batch.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, V={args.vocab}, best of {args.repeats}")
    results = []
    for num_rows in args.rows:
        logits = torch.randn(num_rows, args.vocab, generator=torch.Generator().manual_seed(1)) * 4
        for kind in KINDS:
            outputs = []
            for path in (per_row, batched):  # fresh state each: a run counts its tokens into the penalties
                params, rows, penalties = setup(kind, num_rows, args.vocab)
                outputs.append(path(logits, params, rows, penalties, [make_generator(p.seed) for p in params]))
            assert outputs[0] == outputs[1], f"{kind}: the paths disagree"
            gens = [make_generator(p.seed) for p in params]
            t_old, t_new = (timed(lambda: path(logits, params, rows, penalties, gens), args.repeats)
                            for path in (per_row, batched))
            results.append({"rows": num_rows, "kind": kind, "per_row_ms": round(t_old * 1e3, 1),
                            "batched_ms": round(t_new * 1e3, 1), "speedup": round(t_old / t_new, 2)})
            print(table(results[-1:], list(results[-1])).splitlines()[-1], flush=True)
    print(table(results, list(results[0])))
    print(f"wrote {write('sampler', {'vocab': args.vocab, 'repeats': args.repeats, 'results': results})}")


if __name__ == "__main__":
    main()
