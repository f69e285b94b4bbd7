"""The engine (continuous batching, sampling, detokenization) vs transformers' batched `generate`.

    python bench/engine.py [--preset v4-tiny] [--concurrency 1,4,8,16,32] [--prompt-len 128]
                           [--min-new-tokens 8] [--max-new-tokens 64] [--workloads mixed,uniform]
                           [--decode-steps eager,compiled] [--repeats 3]

At each concurrency C, C greedy requests with prompts of the same length (transformers' V4 cannot left-pad:
its compressors align windows by absolute position) run on the same tiny model and machine: the v4ray
engine in-process (EngineCore: scheduler, paged cache, sampler) against transformers' `generate` on a batch
of C. Workloads: "mixed" output lengths drawn uniformly from [min, max] (a serving workload: a static batch
runs until its longest member finishes, the engine retires each request when done), and "uniform" (every
request generates max tokens: no scheduling advantage). Throughput counts requested tokens only.

Repeats (--repeats R, default 3): each workload runs R rounds, transformers then each engine mode, so that both
sides see the same phases of a shared host (on the 2-core CI host, latency-bound steps swing by ~30 % over tens of
seconds while throughput-bound GEMMs do not); a row reports the median of each side's totals (the ratio is of
those medians) and the lowest and highest ratio of one round's pair.

Decode steps: "eager" (`enforce_eager`: every step through StepBatch) and "compiled" (decode-only steps as the
fixed-shape step compiled by torch.compile, as `v4ray serve` runs on the CPU; its compile is paid before timing
and reported). Each row compares one of them with transformers on the same prompts in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402


def run_engine(core, prompts, lens) -> tuple[float, float]:
    """Total seconds and mean time per output token after each request's first."""
    from v4ray.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    for i, (ids, n) in enumerate(zip(prompts, lens)):
        core.add_request(f"r{i}-{t0}", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    first, done = {}, {}
    while core.has_work():
        outs = core.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = (now, len(o.outputs[0].token_ids))
    end = time.perf_counter()
    tpots = [(t - first[r]) / (n - 1) for r, (t, n) in done.items() if n > 1]
    return end - t0, sum(tpots) / max(1, len(tpots))


def run_hf(model, prompts, lens) -> tuple[float, float]:
    """A static batch generates until its longest request is done."""
    new_tokens = max(lens)
    import torch

    x = torch.tensor(prompts)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(x),
                       pad_token_id=2)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       attention_mask=torch.ones_like(x), pad_token_id=2)
        total = time.perf_counter() - t0
    return total, (total - ttft) / max(1, new_tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--concurrency", default="1,4,8,16,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--min-new-tokens", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--workloads", default="mixed,uniform")
    ap.add_argument("--decode-steps", default="eager,compiled")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per workload (module docstring)")
    args = ap.parse_args()
    import random

    import torch
    from transformers import DeepseekV4ForCausalLM

    from v4ray.engine.core import EngineCore
    from v4ray.model.loader import load_model
    from v4ray.engine.runner import ModelRunner
    from v4ray.model.tiny import make_tiny
    from v4ray.model.tokenizer import V4Tokenizer

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "ckpt", preset=args.preset, dtype="fp32")
    cores, compile_s = {}, None
    for mode in args.decode_steps.split(","):
        t0 = time.perf_counter()
        runner = ModelRunner(load_model(ckpt, torch.float32), 256 << 20, 64, decode_step=mode, max_model_len=4096)
        if mode == "compiled":
            compile_s = round(time.perf_counter() - t0, 1)
            print(f"compiled decode step ready in {compile_s} s", flush=True)
        cores[mode] = EngineCore(runner, V4Tokenizer.from_dir(ckpt), 4096, max_num_batched_tokens=8192,
                                 max_num_seqs=64)
    hf = DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    rng = random.Random(0)
    for workload in args.workloads.split(","):
        for c in [int(x) for x in args.concurrency.split(",")]:
            prompts = torch.randint(16, 272, (c, args.prompt_len), generator=g).tolist()
            lens = ([rng.randint(args.min_new_tokens, args.max_new_tokens) for _ in range(c)] if workload == "mixed"
                    else [args.max_new_tokens] * c)
            run_hf(hf, prompts, [2] * c)  # warm-up
            for core in cores.values():
                run_engine(core, prompts, [4] * c)
            hf_runs, runs = [], {mode: [] for mode in cores}
            for _ in range(args.repeats):  # rounds: each side sees the same phases of the host
                hf_runs.append(run_hf(hf, prompts, lens))
                for mode, core in cores.items():
                    runs[mode].append(run_engine(core, prompts, lens))
            n = sum(lens)
            h_total, h_tpot = median(t for t, _ in hf_runs), median(p for _, p in hf_runs)
            for mode in cores:
                e_total, e_tpot = median(t for t, _ in runs[mode]), median(p for _, p in runs[mode])
                paired = [h / e for (h, _), (e, _) in zip(hf_runs, runs[mode])]
                rows.append({"workload": workload, "concurrency": c, "decode_step": mode,
                             "v4ray_tok_s": round(n / e_total, 1), "hf_tok_s": round(n / h_total, 1),
                             "ratio": round(h_total / e_total, 2), "ratio_range": [round(min(paired), 2),
                                                                                   round(max(paired), 2)],
                             "v4ray_tpot_ms": round(1e3 * e_tpot, 2), "hf_tpot_ms": round(1e3 * h_tpot, 2)})
                print(rows[-1], flush=True)
    print(table(rows, ["workload", "concurrency", "decode_step", "v4ray_tok_s", "hf_tok_s", "ratio", "ratio_range",
                       "v4ray_tpot_ms", "hf_tpot_ms"]))
    path = write("engine", {"preset": args.preset, "prompt_len": args.prompt_len, "compile_s": compile_s,
                            "repeats": args.repeats,
                            "new_tokens": [args.min_new_tokens, args.max_new_tokens], "rows": rows,
                            "baseline": "transformers generate, batch = concurrency, runs to the longest request"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
