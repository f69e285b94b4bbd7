"""The distributed replica (Router + ExpertShard actors, all-to-all) vs the single-process model.

    python bench/expert_parallel.py [--routers 1] [--shards 2] [--batch 8] [--prompt-len 128] [--new-tokens 32]
                                    [--controls tasks,compiled_graph] [--ping-pong off,on]

Same tiny model and batch on both; for every control path (`replica_control`: a Ray task per rank, or the compiled
step graph) and ping-pong setting (`ping_pong`: decode steps as two micro-batches), reports decode tokens/s and the
ratio to one process; the control overhead alone (a step of a replica with no request: the driver's round trip to
every rank, no exchange) and an empty lockstep step (routers with nothing to run still meet in every MoE layer's
exchanges, once per micro-batch: the round trip plus the collectives' floor); per-phase time on the routers and
shards; and from the ranks' busy intervals (one monotonic clock on this host) the time per step the routers compute,
the shards compute, and both compute at once: the overlap ping-pong buys.

First, without Ray or the model, the floor the transport sets (`gloo_floor`): R + S bare processes on this host
run one MoE layer's three gloo collectives (counts, a fixed-capacity dispatch of batch x top_k rows per router to
every shard, the combine back: the shapes of a decode step's exchange) again and again; the median and 90th
percentile of one layer's exchange, times the model's MoE layers, is what a lockstep decode step costs in
collectives alone, before any control path or compute.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402


def decode(engine, prompts, new_tokens, after_prefill=lambda: None) -> tuple[float, float]:
    """Greedy decode of every prompt together through the engine API -> (start, end) on perf_counter's clock, from
    after the prefill step (which also samples each sequence's first token) to the last token."""
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
    return t, time.perf_counter()


def merged(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def busy_within(ranks: list[dict], t0: float, t1: float) -> list[tuple[float, float]]:
    """The union of the ranks' busy intervals, clipped to [t0, t1]."""
    return merged((max(a, t0), min(b, t1)) for r in ranks for a, b in r["busy"] if b > t0 and a < t1)


def overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Seconds covered by both unions of disjoint sorted intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def _exchange_rank(rank: int, routers: int, world: int, rows: int, width: int, reps: int, store: str,
                   out: str) -> None:
    """One rank of `gloo_floor`: one MoE layer's collectives as a decode step issues them, timed per layer."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    shards = world - routers
    router = rank < routers
    send_rows = [0] * routers + [rows if router else 0] * shards    # a router sends every shard a full block
    recv_rows = [0] * world if router else [rows] * routers + [0] * shards
    counts, counts_in = torch.zeros(world, 2, dtype=torch.int64), torch.empty(world, 2, dtype=torch.int64)
    payload, inbox = torch.zeros(sum(send_rows), width + 2), torch.empty(sum(recv_rows), width + 2)
    back, home = torch.zeros(sum(recv_rows), width), torch.empty(sum(send_rows), width)

    def layer() -> None:
        dist.all_to_all_single(counts_in, counts)
        dist.all_to_all_single(inbox, payload, recv_rows, send_rows)
        dist.all_to_all_single(home, back, send_rows, recv_rows)

    times = []
    for _ in range(reps + 20):
        t = time.perf_counter()
        layer()
        times.append(time.perf_counter() - t)
    dist.barrier()
    if rank == 0:
        Path(out).write_text(" ".join(str(x) for x in times[20:]))
    dist.destroy_process_group()


def gloo_floor(routers: int, shards: int, rows: int, width: int, reps: int = 300) -> dict:
    """One MoE layer's exchange among R + S bare processes (no Ray, no model) -> ms per layer, median and p90."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times"
        mp.spawn(_exchange_rank, args=(routers, routers + shards, rows, width, reps, f"{tmp}/store", out),
                 nprocs=routers + shards)
        times = sorted(float(x) for x in Path(out).read_text().split())
    return {"layer_median_ms": round(1e3 * times[len(times) // 2], 3),
            "layer_p90_ms": round(1e3 * times[int(0.9 * len(times))], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v4-tiny")
    ap.add_argument("--routers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--controls", default="tasks,compiled_graph", help="replica_control values to run, in order")
    ap.add_argument("--ping-pong", default="off,on", help="ping_pong settings to run with each control (off, on)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import torch

    from v4ray.cluster.local_ray import ensure_ray
    from v4ray.cluster.replica import Replica, ReplicaConfig, ReplicaEngine
    from v4ray.engine.build import build_engine_core
    from v4ray.engine.config import EngineConfig
    from v4ray.model.config import V4Config
    from v4ray.model.tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "ckpt", preset=args.preset, dtype="fp32")
    cfg = V4Config.from_file(ckpt)
    floor = gloo_floor(args.routers, args.shards, args.batch * cfg.num_experts_per_tok, cfg.hidden_size)
    layers = cfg.num_hidden_layers   # every V4 layer is a MoE layer
    floor |= {"moe_layers": layers, "step_median_ms": round(layers * floor["layer_median_ms"], 2),
              "step_p90_ms": round(layers * floor["layer_p90_ms"], 2)}
    print(f"gloo floor, {args.routers + args.shards} bare processes, one decode step's exchanges:", floor, flush=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(16, 272, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    N = args.new_tokens * args.batch

    local = build_engine_core(EngineConfig(model=str(ckpt), dtype="float32", max_num_seqs=args.batch,
                                           max_num_batched_tokens=args.batch * args.prompt_len))
    decode(local, prompts, 4)
    t0, t1 = decode(local, prompts, args.new_tokens)
    local_s = t1 - t0

    ensure_ray(num_cpus=max(4, args.routers + args.shards))
    runs = {}
    for control, ping in itertools.product(args.controls.split(","), args.ping_pong.split(",")):
        name = f"{control}, ping-pong {ping}"
        rep = Replica(ReplicaConfig(EngineConfig(model=str(ckpt), dtype="float32", num_routers=args.routers,
                                                 num_expert_shards=args.shards, max_num_seqs=args.batch,
                                                 max_num_batched_tokens=args.batch * args.prompt_len,
                                                 replica_control=control, ping_pong=ping == "on"))).start()
        engine = ReplicaEngine(rep)
        try:
            decode(engine, prompts, 4)
            snap = {}
            t0, t1 = decode(engine, prompts, args.new_tokens, lambda: snap.setdefault("before", rep.stats()))
            before = snap["before"]
            after = rep.stats()
            idle = {}
            for what, micro_batches in (("control_ms", 0), ("empty_lockstep_ms", 2 if ping == "on" else 1)):
                for _ in range(5):
                    rep.run_step(micro_batches)
                t = time.perf_counter()
                for _ in range(50):
                    rep.run_step(micro_batches)
                idle[what] = round(1e3 * (time.perf_counter() - t) / 50, 3)
        finally:
            rep.shutdown()
        runs[name] = (t1 - t0, before, after, idle, (t0, t1))
        print(name, f"{local_s / (t1 - t0):.2f}x single process", idle, flush=True)

    steps = args.new_tokens
    rows = [{"path": "single process", "tokens_per_s": round(N / local_s, 1), "ms_per_step": round(1e3 * local_s / steps, 2)}]
    phases = {}
    for name, (d_s, before, after, idle, (t0, t1)) in runs.items():
        routers, shards = busy_within(after["routers"], t0, t1), busy_within(after["shards"], t0, t1)
        ms = lambda sec: round(1e3 * sec / steps, 2)  # noqa: E731
        rows.append({"path": f"R={args.routers} S={args.shards} {name}", "tokens_per_s": round(N / d_s, 1),
                     "ms_per_step": ms(d_s), "vs_single_process": round(local_s / d_s, 3), **idle,
                     "routers_busy_ms": ms(sum(b - a for a, b in routers)),
                     "shards_busy_ms": ms(sum(b - a for a, b in shards)), "both_busy_ms": ms(overlap(routers, shards))})

        def delta(side: str, i: int) -> dict:
            a, b = after[side][i]["phases"], before[side][i]["phases"]
            return {k: a[k] - b.get(k, 0.0) for k in a}

        per_step = {f"router {k}": ms(v) for k, v in delta("routers", 0).items()}
        shard = [delta("shards", i) for i in range(args.shards)]
        per_step |= {f"shard {k} (mean)": ms(sum(d.get(k, 0.0) for d in shard) / args.shards) for k in shard[0]}
        phases[name] = per_step
    print(table(rows, ["path", "tokens_per_s", "ms_per_step", "vs_single_process", "control_ms", "empty_lockstep_ms",
                       "routers_busy_ms", "shards_busy_ms", "both_busy_ms"]))
    for name, per_step in phases.items():
        print(f"phases per step, {name} (ms):", per_step)
    print("gloo floor (bare processes, the step's collectives alone):", floor)
    path = write("expert_parallel", {"preset": args.preset, "routers": args.routers, "shards": args.shards,
                                     "batch": args.batch, "prompt_len": args.prompt_len,
                                     "new_tokens": args.new_tokens, "rows": rows, "phase_ms_per_step": phases,
                                     "gloo_floor": floor})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
