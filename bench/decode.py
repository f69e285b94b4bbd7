"""Batched incremental decode vs full recomputation vs transformers' `generate`, same tiny model and batch.

    python bench/decode.py [--preset v4-tiny] [--batch 8] [--prompt-len 128] [--new-tokens 32]

Each path runs greedy decoding of `new_tokens` tokens for `batch` equal-length prompts (prefill included) and
reports generated tokens per second; ratios are against the full-recompute loop of the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from v4ray.model.kv_cache import PagedKVCache, StepBatch
    from v4ray.model.loader import load_model
    from v4ray.model.tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "ckpt", preset=args.preset, dtype="fp32", seed=0)
    model = load_model(ckpt, torch.float32)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    prompts = torch.randint(16, 272, (B, P), generator=torch.Generator().manual_seed(0))

    def incremental():
        cache = PagedKVCache(model.cfg, num_blocks=B * -(-(P + N) // 256), num_slots=B)
        seqs = [cache.allocate(P) for _ in range(B)]
        logits = model.step(prompts.flatten(), StepBatch.build(cache, seqs, [P] * B))
        out = []
        for _ in range(N):
            tok = logits.argmax(-1)
            out.append(tok)
            for s in seqs:
                cache.append(s, 1)
            logits = model.step(tok, StepBatch.build(cache, seqs, [1] * B))
        return torch.stack(out, 1)

    def full_recompute():
        out = []
        for b in range(B):
            seq = prompts[b].tolist()
            for _ in range(N):
                seq.append(int(model(torch.tensor(seq))[-1].argmax()))
            out.append(seq[P:])
        return torch.tensor(out)

    from transformers import DeepseekV4ForCausalLM

    ref = DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def hf_generate():
        with torch.no_grad():
            return ref.generate(prompts, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                attention_mask=torch.ones_like(prompts), pad_token_id=2)[:, P:]

    rows = []
    for name, fn, reps in (("v4ray incremental (paged cache)", incremental, args.repeat),
                           ("v4ray full recompute", full_recompute, 1),
                           ("transformers generate", hf_generate, args.repeat)):
        t = timed(fn, repeat=reps, warmup=1 if reps > 1 else 0)
        rows.append({"path": name, "seconds": round(t, 3), "tokens_per_s": round(B * N / t, 1)})
    base = rows[1]["tokens_per_s"]
    for r in rows:
        r["vs_full_recompute"] = round(r["tokens_per_s"] / base, 2)
    print(table(rows, ["path", "seconds", "tokens_per_s", "vs_full_recompute"]))
    ours, hf = rows[0]["tokens_per_s"], rows[2]["tokens_per_s"]
    print(f"incremental vs transformers generate: {ours / hf:.2f}x")
    path = write("decode", {"preset": args.preset, "batch": B, "prompt_len": P, "new_tokens": N, "rows": rows,
                            "incremental_vs_transformers": round(ours / hf, 2)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
