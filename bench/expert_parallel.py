"""The distributed replica (Router + ExpertShard actors, all-to-all) vs the single-process model.

    python bench/expert_parallel.py [--routers 1] [--shards 2] [--batch 8] [--prompt-len 128] [--new-tokens 32]
                                    [--controls tasks,compiled_graph]

Same tiny model and batch on both; reports decode tokens/s and their ratio, per-phase time on the replica
(attention and dense work, dispatch, expert compute, combine), and per step of each control path (`replica_control`:
a Ray task per rank, or the compiled step graph): the control overhead alone (a step of a replica with no request:
the driver's round trip to every rank, no exchange) and an empty lockstep step (routers with nothing to run still
meet in every MoE layer's exchanges: the round trip plus the collectives' floor).
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


def decode(engine, prompts, new_tokens, after_prefill=lambda: None):
    """Greedy decode of every prompt together through the engine API; seconds after the prefill step."""
    from v4ray.engine.sampling import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}-{time.perf_counter()}", p, params)
    engine.step()   # prefill (the budget holds every prompt) and each sequence's first token
    after_prefill()
    t = time.perf_counter()
    while engine.has_work():
        engine.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--routers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--controls", default="tasks,compiled_graph", help="replica_control values to run, in order")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import torch

    from v4ray.cluster.local_ray import ensure_ray
    from v4ray.cluster.replica import Replica, ReplicaConfig, ReplicaEngine
    from v4ray.engine.build import build_engine_core
    from v4ray.engine.config import EngineConfig
    from v4ray.model.tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "ckpt", preset=args.preset, dtype="fp32")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(16, 272, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    N = args.new_tokens * args.batch

    local = build_engine_core(EngineConfig(model=str(ckpt), dtype="float32", max_num_seqs=args.batch,
                                           max_num_batched_tokens=args.batch * args.prompt_len))
    decode(local, prompts, 4)
    local_s = decode(local, prompts, args.new_tokens)

    ensure_ray(num_cpus=max(4, args.routers + args.shards))
    runs = {}
    for control in args.controls.split(","):
        rep = Replica(ReplicaConfig(EngineConfig(model=str(ckpt), dtype="float32", num_routers=args.routers,
                                                 num_expert_shards=args.shards, max_num_seqs=args.batch,
                                                 max_num_batched_tokens=args.batch * args.prompt_len,
                                                 replica_control=control))).start()
        engine = ReplicaEngine(rep)
        try:
            decode(engine, prompts, 4)
            snap = {}
            dist_s = decode(engine, prompts, args.new_tokens, lambda: snap.setdefault("before", rep.stats()))
            before, after = snap["before"], rep.stats()
            idle = {}
            for name, active in (("control_ms", False), ("empty_lockstep_ms", True)):
                for _ in range(5):
                    rep.run_step(active)
                t = time.perf_counter()
                for _ in range(50):
                    rep.run_step(active)
                idle[name] = round(1e3 * (time.perf_counter() - t) / 50, 3)
        finally:
            rep.shutdown()
        runs[control] = (dist_s, before, after, idle)
        print(control, f"{local_s / dist_s:.2f}x single process", idle, flush=True)
    control = args.controls.split(",")[-1]
    dist_s, before, after, _ = runs[control]

    def delta(side: str, i: int, key: str) -> dict:
        a, b = after[side][i][key], before[side][i][key]
        return {k: a[k] - b.get(k, 0.0) for k in a} if isinstance(a, dict) else a - b

    steps = args.new_tokens
    phases = delta("routers", 0, "phases")
    expert = sum(delta("shards", i, "phases").get("expert", 0.0) for i in range(args.shards)) / args.shards
    rows = [{"path": "single process", "tokens_per_s": round(N / local_s, 1), "ms_per_step": round(1e3 * local_s / steps, 2)}]
    for name, (d_s, _, _, idle) in runs.items():
        rows.append({"path": f"replica R={args.routers} S={args.shards} {name}", "tokens_per_s": round(N / d_s, 1),
                     "ms_per_step": round(1e3 * d_s / steps, 2), "vs_single_process": round(local_s / d_s, 3),
                     **idle})
    print(table(rows, ["path", "tokens_per_s", "ms_per_step", "vs_single_process", "control_ms", "empty_lockstep_ms"]))
    per_step = {k: round(1e3 * v / steps, 2) for k, v in phases.items()}
    per_step["expert (shard mean)"] = round(1e3 * expert / steps, 2)
    print(f"router phases per step with {control} (ms):", per_step)
    path = write("expert_parallel", {"preset": args.preset, "routers": args.routers, "shards": args.shards,
                                     "batch": args.batch, "prompt_len": args.prompt_len,
                                     "new_tokens": args.new_tokens, "rows": rows, "phases_of": control,
                                     "phase_ms_per_step": per_step})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
