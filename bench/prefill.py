"""Prefill of one long prompt: the sliding window as a band vs the dense window bias (the torch backend).

    python bench/prefill.py [--preset v4-tiny] [--prompt-lens 1024,2048,4096] [--steps eager,compiled]

A prompt chunk alone in its attention group attends to its window as a band on the torch backend
(`StepBatch.banded`, kernels/attention.py `banded_sink_attention`: n (2w - 1) window scores); the dense form scores
every query against every key of the chunk, n (n + w - 1), masked outside the window. Each length runs both ways in
the same process (the band switched off by raising `StepBatch.BANDED_MIN_WINDOWS`), with the step's regions eager
and compiled (`v4ray serve`'s CPU engine; their compile is paid before timing). Best of --repeat prefills of fresh
random prompts; reports the ratio dense / banded per length.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--prompt-lens", default="1024,2048,4096")
    ap.add_argument("--steps", default="eager,compiled")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import torch

    from v4ray.engine.runner import ModelRunner
    from v4ray.model.kv_cache import StepBatch
    from v4ray.model.loader import load_model
    from v4ray.model.tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "ckpt", preset=args.preset, dtype="fp32")
    lens = [int(x) for x in args.prompt_lens.split(",")]
    banded_from = StepBatch.BANDED_MIN_WINDOWS
    rows = []
    g = torch.Generator().manual_seed(0)
    for mode in args.steps.split(","):
        runner = ModelRunner(load_model(ckpt, torch.float32), 1 << 30, 4, decode_step=mode,
                             max_model_len=max(lens) + 16)
        window = runner.model.cfg.sliding_window
        for n in lens:
            best = {}
            for form in ("dense", "banded", "dense", "banded"):  # interleaved: the first of each warms up
                StepBatch.BANDED_MIN_WINDOWS = banded_from if form == "banded" else 1 << 30
                for i in range(args.repeat):
                    key = f"{mode}-{n}-{form}-{i}-{len(rows)}-{time.perf_counter()}"
                    runner.admit(key, n)
                    ids = torch.randint(16, 272, (n,), generator=g).tolist()
                    t0 = time.perf_counter()
                    runner.step([(key, ids, [n - 1])])
                    best[form] = min(best.get(form, float("inf")), time.perf_counter() - t0)
                    runner.release(key)
            StepBatch.BANDED_MIN_WINDOWS = banded_from
            rows.append({"steps": mode, "prompt_len": n, "window": window, "dense_ms": round(1e3 * best["dense"], 1),
                         "banded_ms": round(1e3 * best["banded"], 1),
                         "ratio": round(best["dense"] / best["banded"], 2)})
            print(rows[-1], flush=True)
    print(table(rows, ["steps", "prompt_len", "window", "dense_ms", "banded_ms", "ratio"]))
    print(f"wrote {write('prefill', {'preset': args.preset, 'rows': rows})}")


if __name__ == "__main__":
    main()
