"""Real-size checkpoint loading: what each rank of an expert-parallel replica reads, keeps and peaks at.

    python bench/load.py [--dir ~/.cache/v4ray/bench-load] [--experts 64] [--tokens 8] [--small]

Writes once (cached under --dir) a slice of V4-Flash at its real dimensions in the official format
(`model.tiny.make_tiny`: FP8 dense linears with ue8m0 128x128 scales, FP4 routed experts with per-32 scales,
BF16 embedding/head/gate/compressors): real layers 0 (sliding window, hash-routed MoE) and 4 (CSA, top-k MoE)
of model/presets/deepseek-v4-flash.json, renumbered 0 and 1, with --experts routed experts per layer (each at
its real size; 256 is the full layer, about 9 GB on disk). All routed experts share one file, interleaved by
name, as in the official checkpoint where a file holds whole layers: a shard must pick its own tensors out of a
file that also holds the other shard's.

It then loads the slice as one replica on this machine's CPU, each rank in its own process: the router's model
without routed experts (`load_model(expert_range=(0, 0))`), and two expert shards (`load_expert_weights` of
half the experts each, keep_quantized as shards do); then, after those exit, the single-process model
(`load_model`, all experts). Ranks load one at a time, each from a cold page cache. Per rank it reports:

* read: bytes the process fetched from storage (/proc/self/io `read_bytes`, counted by the kernel when a
  page-cache miss is filled for this process: readahead included, cache hits excluded). The parent evicts every
  checkpoint file from the page cache right before each rank's load (fsync, then posix_fadvise DONTNEED, which
  needs no privilege), so every byte the rank needs is a miss and is counted once. The loader is not asked:
  this is what the kernel read. It is compared with
  - own: the bytes the rank's tensors take in the files, from the headers (read/own near 1 shows both that the
    rank read nothing else and that the cache was cold: below 1 the eviction failed), and
  - kept: the bytes of the tensors the rank holds after the load (issue 16's goal: read/kept <= 1.05). Kept
    exceeds own where the loader widens a stored dtype (the fp32 linears: LM head, gate, compressors).
* RSS/kept: peak resident set growth over the rank's baseline after imports (the peak is reset by writing 5 to
  /proc/self/clear_refs right before the load; VmHWM afterwards minus VmRSS at the reset) over the bytes kept.
  VmHWM includes file pages a memory map keeps resident, so a loader that maps the files shows up here.
* load time and read GB/s.

Then one forward of --tokens tokens at real dimensions: the router and its two shards over a gloo process group
(`actors.expert_parallel`), and the single-process model; both logits must be finite and equal.
Writes bench/results/load.json (--small: load_small.json, which tests/test_load_bench.py runs: real width, a
small vocabulary, one CSA hash-routed layer, 8 experts).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402

# Expert values repeat every DISTINCT_EXPERTS experts (cheap to write: FP4 quantization dominates), a count that
# divides no shard boundary, so a shard serving the wrong expert would change the logits.
DISTINCT_EXPERTS = {"slice": 7, "small": 3}
GB = 1e9
ROLES = ("router", "shard0", "shard1")


def slice_config(experts: int, small: bool = False):
    """The slice's V4Config and the real layer ids it keeps."""
    from v4ray.model.config import load_preset

    real = load_preset("deepseek-v4-flash")
    ratios = real.compress_ratios
    if small:   # one layer with both CSA and hash routing, and a small vocabulary (embedding and head)
        layers = [next(i for i, r in enumerate(ratios) if r == 4 and real.is_hash_layer(i))]
    else:       # hash layers come first, as in the real schedule
        layers = [next(i for i, r in enumerate(ratios) if r == 0 and real.is_hash_layer(i)),
                  next(i for i, r in enumerate(ratios) if r == 4 and not real.is_hash_layer(i))]
    cfg = real.replace(num_hidden_layers=len(layers), layer_types=tuple(real.layer_types[i] for i in layers),
                       compress_ratios=tuple(ratios[i] for i in layers), n_routed_experts=experts,
                       num_hash_layers=sum(real.is_hash_layer(i) for i in layers),
                       vocab_size=4096 if small else real.vocab_size)
    return cfg, layers


def ensure_checkpoint(root: Path, experts: int, small: bool) -> tuple[Path, list[int]]:
    """Write the slice once; a finished checkpoint is marked by `complete.json`."""
    from v4ray.model.tiny import make_tiny

    cfg, layers = slice_config(experts, small)
    ckpt = root / f"v4-flash-{'small' if small else 'slice'}-layers{'-'.join(map(str, layers))}-e{experts}"
    if (ckpt / "complete.json").exists():
        return ckpt, layers
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    print(f"writing {ckpt} (once) ...", flush=True)
    make_tiny(tmp, cfg=cfg, dtype="fp4-experts", seed=0, experts_per_file=experts,
              distinct_experts=DISTINCT_EXPERTS["small" if small else "slice"])
    (tmp / "complete.json").write_text(json.dumps({"real_layers": layers, "experts": experts,
                                                   "write_s": round(time.perf_counter() - t, 1)}))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)
    return ckpt, layers


def evict(ckpt: Path) -> None:
    """Drop the checkpoint's files from the page cache (written pages are flushed first: dirty pages stay)."""
    for f in ckpt.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}  # others: 1 byte


def own_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes each role's tensors take in the files, from the safetensors headers (safetensors' own reader, not
    v4ray's): the router's are every tensor but the routed experts', a shard's its half of the experts'."""
    from safetensors import safe_open

    from v4ray.model.expert_placement import ExpertPlacement
    from v4ray.model.loader import official_name

    cfg = json.loads((ckpt / "config.json").read_text())
    halves = ExpertPlacement.contiguous(cfg["n_routed_experts"], 2).ranges
    out = dict.fromkeys(ROLES + ("single",), 0)
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                name = official_name(key)
                if name is None:
                    continue
                s = h.get_slice(key)
                nbytes = math.prod(s.get_shape()) * _DTYPE_BYTES.get(s.get_dtype(), 1)
                m = re.search(r"\.ffn\.experts\.(\d+)\.", name)
                role = "router" if m is None else ROLES[1 + next(i for i, (a, b) in enumerate(halves)
                                                                 if a <= int(m.group(1)) < b)]
                out[role] += nbytes
                out["single"] += nbytes
    return out


def _read_bytes() -> int:
    return int(re.search(r"^read_bytes: (\d+)", Path("/proc/self/io").read_text(), re.M).group(1))


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _rank(role: str, ckpt: str, tokens: int, go, results, addresses) -> None:
    """One rank: wait for a cold cache, load and measure, then (distributed roles) join the group and run one
    forward; puts its measurement and (router, single) its logits on `results`."""
    import torch

    from v4ray.actors.expert_parallel import RouterExchange, ShardServer, init_group, rendezvous_listener
    from v4ray.model.config import V4Config
    from v4ray.model.expert_placement import ExpertPlacement
    from v4ray.model.loader import load_expert_weights, load_model

    torch.set_num_threads(2)
    torch.empty(1).numpy()                                  # everything the load touches is imported now
    cfg = V4Config.from_file(ckpt)
    placement = ExpertPlacement.contiguous(cfg.n_routed_experts, 2)
    exchange = RouterExchange(0, 3, 1, placement, cfg.hidden_size) if role == "router" else None
    go.wait()
    Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS
    base_kb, io0, t0 = _status_kb("VmRSS"), _read_bytes(), time.perf_counter()
    if role == "router":
        held = load_model(ckpt, torch.bfloat16, expert_range=(0, 0), keep_quantized=True, cfg=cfg,
                          expert_backend=exchange)
        kept = sum(t.nbytes for t in held.state_dict().values())
        n_experts = 0
    elif role == "single":
        held = load_model(ckpt, torch.bfloat16, keep_quantized=True, cfg=cfg)
        kept = sum(t.nbytes for t in held.state_dict().values())
        n_experts = cfg.n_routed_experts
    else:
        ids = placement.shard_experts(int(role[-1]))
        held = load_expert_weights(ckpt, ids, torch.bfloat16, keep_quantized=True, cfg=cfg)
        kept = sum(q.nbytes for layer in held for ws in layer.values() for q in ws)
        n_experts = len(ids)
    seconds = time.perf_counter() - t0
    read, peak_kb = _read_bytes() - io0, _status_kb("VmHWM")
    results.put((role, {"experts": n_experts, "kept_bytes": kept, "read_bytes": read, "load_s": seconds,
                        "rss_growth_bytes": (peak_kb - base_kb) * 1024}))

    ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    if role == "single":
        results.put(("logits", held(ids).numpy()))  # by value: a shared tensor dies with its process
        return
    if role == "router":
        listener = rendezvous_listener("127.0.0.1")
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        for q in addresses:
            q.put(address)
        init_group(address, 0, 3, timeout_s=600, listener=listener, backend="gloo")
        results.put(("logits", held(ids).numpy()))  # by value: a shared tensor dies with its process
    else:
        init_group(addresses[int(role[-1])].get(), 1 + int(role[-1]), 3, timeout_s=600, backend="gloo")
        ShardServer(3, cfg.hidden_size, held, torch.bfloat16, cfg.swiglu_limit).serve_step()
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def _run(ckpt: Path, roles: tuple[str, ...], tokens: int) -> tuple[dict, object]:
    """Start `roles` (one process each), let them load one at a time from a cold cache, run the forward."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addresses = [ctx.Queue() for _ in roles[1:]]
    gos = {r: ctx.Event() for r in roles}
    procs = [ctx.Process(target=_rank, args=(r, str(ckpt), tokens, gos[r], results, addresses)) for r in roles]
    for p in procs:
        p.start()
    def get():
        while True:
            try:
                return results.get(timeout=5)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in zip(roles, procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank process(es) failed (role, exit code): {dead}")

    rows, logits = {}, None
    try:
        for r in roles:
            evict(ckpt)
            gos[r].set()
            role, row = get()
            rows[role] = row
        role, logits = get()
        for p in procs:
            p.join(timeout=600)
            if p.exitcode != 0:
                raise RuntimeError(f"rank process exited with {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return rows, logits


def measure(ckpt: Path, tokens: int = 8) -> dict:
    """Load the checkpoint as router + 2 shards, then as one process; per-rank numbers and the forward check."""
    import torch

    rows, dist_logits = _run(ckpt, ROLES, tokens)
    single, single_logits = _run(ckpt, ("single",), tokens)
    dist_logits, single_logits = torch.from_numpy(dist_logits), torch.from_numpy(single_logits)
    rows.update(single)
    for role, stored in own_bytes(ckpt).items():
        r = rows[role]
        r["stored_bytes"] = stored
        r["read_over_stored"] = r["read_bytes"] / stored
        r["read_over_kept"] = r["read_bytes"] / r["kept_bytes"]
        r["rss_over_kept"] = r["rss_growth_bytes"] / r["kept_bytes"]
        r["read_gb_s"] = r["read_bytes"] / GB / r["load_s"]
    finite = bool(torch.isfinite(dist_logits).all() and torch.isfinite(single_logits).all())
    return {"checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir()), "ranks": rows,
            "forward": {"tokens": tokens, "finite": finite, "equal": bool(torch.equal(dist_logits, single_logits)),
                        "max_abs_diff": float((dist_logits - single_logits).abs().max())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "v4ray" / "bench-load")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default 64; --small 8)")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="real width, small vocab, one layer, 8 experts")
    ap.add_argument("--json", type=Path, default=None, help="write the results here instead of bench/results/")
    args = ap.parse_args()
    experts = args.experts or (8 if args.small else 64)
    ckpt, layers = ensure_checkpoint(args.dir, experts, args.small)
    out = measure(ckpt, args.tokens)
    out.update(checkpoint=str(ckpt), real_layers=layers, experts_per_layer=experts)
    rows = [{"rank": role, "experts": r["experts"], "own GB": f"{r['stored_bytes'] / GB:.3f}",
             "read GB": f"{r['read_bytes'] / GB:.3f}", "read/own": f"{r['read_over_stored']:.3f}",
             "kept GB": f"{r['kept_bytes'] / GB:.3f}", "read/kept": f"{r['read_over_kept']:.3f}",
             "RSS growth GB": f"{r['rss_growth_bytes'] / GB:.3f}", "RSS/kept": f"{r['rss_over_kept']:.3f}",
             "load s": f"{r['load_s']:.2f}", "read GB/s": f"{r['read_gb_s']:.2f}"}
            for role, r in out["ranks"].items()]
    print(f"checkpoint {ckpt}: {out['checkpoint_bytes'] / GB:.2f} GB, real layers {layers}, {experts} experts/layer")
    print(table(rows, list(rows[0])))
    f = out["forward"]
    print(f"forward of {f['tokens']} tokens: logits finite {f['finite']}, router+2 shards == single process "
          f"{f['equal']} (max |diff| {f['max_abs_diff']:.3g})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json or write('load_small' if args.small else 'load', out)}")


if __name__ == "__main__":
    main()
