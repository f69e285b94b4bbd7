"""Router and ExpertShard actors with all-to-all, on a 3-node simulated Ray cluster, against the single-process
engine (the same engine API, no actors); and the exchange itself in one process per rank over a real gloo group,
its tensors followed as device-resident (tests/device_provenance.py) to count host syncs per MoE layer."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import shutil
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from v4ray.cluster.replica import Replica, ReplicaConfig, ReplicaEngine, ReplicaError
from v4ray.engine.config import EngineConfig
from v4ray.engine.sampling import SamplingParams
from v4ray.model.config import load_preset
from v4ray.model.expert_placement import ExpertPlacement
from v4ray.model.loader import INDEX_FILE
from v4ray.model.tiny import expert_files

from conftest import parity_prompt
from device_provenance import DEVICE, Provenance, kernels_as_device_ops, to_device
from test_device_provenance import MAX_SYNCS_PER_DECODE_STEP
from test_parity import PARITY_RTOL, TIE_GAP

DECODE_STEPS = 32
PROMPTS = {"a": 200, "b": 77, "c": 131}
LOGPROBS_K = 20
# Logprobs are logits minus one logsumexp: each differs by at most twice the logits' error, and the logits match
# within PARITY_RTOL of their largest magnitude (about 5 for these tiny models; 10 leaves room).
LOGPROB_ATOL = 2 * PARITY_RTOL * 10


def _local_engine(ckpt):
    from v4ray.engine.build import build_engine_core

    return build_engine_core(EngineConfig(model=str(ckpt), dtype="float32", kv_cache_bytes=64 << 20, max_num_seqs=8))


def _shard_copies(ckpt, tmp_path, placement: ExpertPlacement) -> list[str]:
    """One checkpoint copy per shard with the files holding only other shards' experts deleted."""
    dirs = []
    for s in range(placement.num_shards):
        d = tmp_path / f"shard{s}"
        shutil.copytree(ckpt, d)
        mine = set(placement.shard_experts(s))
        for fname, ids in expert_files(d).items():
            if -1 not in ids and ids.isdisjoint(mine):
                (d / fname).unlink()
        dirs.append(str(d))
    return dirs


def _unbalanced(ckpt, tmp_path):
    """Every score-routed layer picks experts 0 and 1; hash layers map every token into experts 0..3."""
    dst = tmp_path / "unbalanced"
    shutil.copytree(ckpt, dst)
    wm = json.loads((dst / INDEX_FILE).read_text())["weight_map"]
    for fname in set(wm.values()):
        t = load_file(dst / fname)
        changed = False
        for name in list(t):
            if name.endswith("ffn.gate.bias"):
                t[name] = torch.zeros_like(t[name])
                t[name][:2] = 100.0
                changed = True
            elif name.endswith("tid2eid"):
                g = torch.Generator().manual_seed(0)
                t[name] = torch.stack([torch.randperm(4, generator=g)[:t[name].shape[1]] for _ in range(t[name].shape[0])])
                changed = True
        if changed:
            save_file(t, dst / fname)
    return dst


def _run(engine, steps: int) -> dict:
    """Three prompts of different lengths through the engine API (the single-process EngineCore or a replica's
    ReplicaEngine), greedy, with the top LOGPROBS_K logprobs of every prompt position and generated token."""
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, logprobs=LOGPROBS_K,
                            prompt_logprobs=LOGPROBS_K)
    for key, n in PROMPTS.items():
        engine.add_request(key, parity_prompt(n, seed=n).tolist(), params)
    final = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def _compare(dist_outs, ref_outs):
    """Per position, the reported logprobs agree within LOGPROB_ATOL (ids the two top-k sets share) and the
    greedy tokens agree — except after a genuine tie, where the two runs fed different tokens."""
    for key in PROMPTS:
        a, b = dist_outs[key], ref_outs[key]
        positions = list(zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])) + \
            list(zip(a.outputs[0].logprobs, b.outputs[0].logprobs))
        tokens = list(zip(a.outputs[0].token_ids, b.outputs[0].token_ids))
        prompt_len = len(a.prompt_logprobs) - 1
        for pos, (pa, pb) in enumerate(positions):
            shared = pa.keys() & pb.keys()
            assert len(shared) >= LOGPROBS_K // 2, f"{key} position {pos}: top-k sets differ"
            worst = max(abs(pa[t].logprob - pb[t].logprob) for t in shared)
            assert worst <= LOGPROB_ATOL, f"{key} position {pos}: logprob differs by {worst:.2e}"
            if pos >= prompt_len:
                got, want = tokens[pos - prompt_len]
                if got != want:  # only at a genuine tie; the continuations then legitimately differ
                    top2 = sorted((e.logprob for e in pb.values()), reverse=True)[:2]
                    assert top2[0] - top2[1] < TIE_GAP
                    break


@pytest.mark.parametrize("routers,shards,control,ping_pong", [
    (1, 2, "compiled_graph", False), (1, 2, "compiled_graph", True), (2, 2, "compiled_graph", False),
    (2, 2, "compiled_graph", True), (1, 3, "compiled_graph", True), (1, 2, "tasks", True)])
def test_layouts_equal_single_process(ray_session, tiny_ckpt, tmp_path, routers, shards, control, ping_pong):
    """Greedy tokens and logprobs of every layout equal one process's, with ping-pong micro-batches on and off: with
    it, one router decodes its 3 requests as halves of 2 and 1 rows; of two routers, the one with 2 requests splits
    them and the other sends its one request and an empty micro-batch."""
    ckpt = tiny_ckpt("v4-tiny")
    placement = ExpertPlacement.contiguous(8, shards)
    rep = Replica(ReplicaConfig(EngineConfig(model=str(ckpt), num_routers=routers, num_expert_shards=shards,
                                             collective_timeout_s=60, replica_control=control, ping_pong=ping_pong),
                                shard_resources={"CPU": 1, "expert_slot": 1},
                                shard_model_dirs=_shard_copies(ckpt, tmp_path, placement))).start()
    try:
        assert (rep._placed.graph is not None) == (control == "compiled_graph")
        info = rep.actor_info()
        shard_nodes = [i["node_id"] for i in info if i["role"] == "expert_shard"]
        assert len(set(shard_nodes)) == shards, "two shards share a node"
        dist_outs = _run(ReplicaEngine(rep), DECODE_STEPS)
        stats = rep.stats()
    finally:
        rep.shutdown()
    _compare(dist_outs, _run(_local_engine(ckpt), DECODE_STEPS))
    assert all(sum(row) > 0 for row in stats["tokens_per_shard"])
    assert stats["routers"][0]["phases"]["dispatch"] > 0 and stats["shards"][0]["phases"]["expert"] > 0
    # decode steps ran the fixed-shape step with fixed-capacity dispatch: no split sizes read back in them
    layers = load_preset("v4-tiny").num_hidden_layers
    for r in stats["routers"]:
        assert r["split_size_reads"] <= (r["steps"] - DECODE_STEPS // 2) * layers, r["split_size_reads"]
    split = [r["ping_pong_steps"] for r in stats["routers"]]
    assert (split[0] >= DECODE_STEPS - 1) if ping_pong else split == [0] * routers, split


def _staggered(engine) -> dict:
    """A request arrives while another decodes (mixed steps), greedy with logprobs."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=LOGPROBS_K)
    engine.add_request("first", parity_prompt(150, seed=1).tolist(), params)
    final = {}
    for step in range(200):
        if step == 3:
            engine.add_request("second", parity_prompt(90, seed=2).tolist(), params)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if len(final) == 2:
            return final
    raise AssertionError(f"not finished: {sorted(final)}")


def test_a_request_arriving_mid_decode_keeps_the_routers_in_lockstep(ray_session, tiny_ckpt, tmp_path):
    """A router's mixed step (a prompt beside decodes) is one forward, so every rank meets every exchange."""
    ckpt = tiny_ckpt("v4-tiny")
    placement = ExpertPlacement.contiguous(8, 2)
    rep = Replica(ReplicaConfig(EngineConfig(model=str(ckpt), num_routers=2, num_expert_shards=2,
                                             collective_timeout_s=60),
                                shard_resources={"CPU": 1, "expert_slot": 1},
                                shard_model_dirs=_shard_copies(ckpt, tmp_path, placement))).start()
    try:
        got = _staggered(ReplicaEngine(rep))
    finally:
        rep.shutdown()
    want = _staggered(_local_engine(ckpt))
    for key in ("first", "second"):
        a, b = got[key].outputs[0], want[key].outputs[0]
        for pos, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:  # only at a genuine tie
                top2 = sorted((e.logprob for e in b.logprobs[pos].values()), reverse=True)[:2]
                assert top2[0] - top2[1] < TIE_GAP, (key, pos)
                break
        else:
            assert len(a.token_ids) == len(b.token_ids) == 12


def test_unbalanced_routing_and_redundant_copy(ray_session, tiny_ckpt, tmp_path):
    ckpt = _unbalanced(tiny_ckpt("v4-tiny"), tmp_path)
    ref = _run(_local_engine(ckpt), 8)
    for redundant in ({}, {0: [1]}):
        rep = Replica(ReplicaConfig(EngineConfig(model=str(ckpt), num_routers=1, num_expert_shards=2),
                                    redundant_experts=redundant)).start()
        try:
            outs = _run(ReplicaEngine(rep), 8)
            stats = rep.stats()
        finally:
            rep.shutdown()
        _compare(outs, ref)
        score_layers = range(1, 4)  # v4-tiny: layer 0 is hash-routed
        for layer in score_layers:
            counts = stats["tokens_per_expert"][layer]
            assert counts[0] == counts[1] == sum(counts) / 2        # experts 0 and 1 take every token
        if not redundant:
            assert all(row[1] == 0 for row in stats["tokens_per_shard"])   # shard 1 gets none
        else:
            shard1 = stats["shards"][1]["tokens_per_expert"]
            assert all(shard1[layer].get(0, 0) > 0 for layer in score_layers)  # the copy of expert 0 serves


@pytest.mark.parametrize("fault,state,ping_pong", [(signal.SIGKILL, "dead", False), (signal.SIGKILL, "dead", True),
                                                   (signal.SIGSTOP, "not answering", False)])
def test_a_failed_shard_fails_fast_and_the_replica_rebuilds(ray_session, tiny_ckpt, fault, state, ping_pong):
    """A shard killed (SIGKILL) or stopped (SIGSTOP, as a hung process or a host cut off looks) mid-generation fails
    the step within the collective timeout (plus a 5 s probe of each rank), the error names it, the shutdown does
    not wait on it, and (after the kill) a new replica generates the single process's tokens. With ping-pong the
    kill lands in a step whose two micro-batches' exchanges are in flight at once. (The compiled step graph's fault
    path is not run here: in Ray 2.60 it crashed a raylet once, which would take the suite's shared cluster down;
    docs/architecture.md §4.)"""
    import ray

    from v4ray import LLM, SamplingParams

    ckpt = tiny_ckpt("v4-tiny")
    prompts = [{"prompt_token_ids": parity_prompt(100 + 7 * i, seed=2 + i).tolist()} for i in range(1 + ping_pong)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    if fault == signal.SIGKILL:
        want = [o.outputs[0].token_ids for o in LLM(model=ckpt, dtype="float32").generate(prompts, greedy)]
    timeout_s = 8.0  # collective timeout for this test only
    llm = LLM(model=ckpt, dtype="float32", num_expert_shards=2, collective_timeout_s=timeout_s, ping_pong=ping_pong,
              replica_options={"step_timeout_s": 3 * timeout_s})
    victim = next(i for i in llm.replica.actor_info() if i["role"] == "expert_shard")
    injector = threading.Timer(1.5, os.kill, (victim["pid"], fault))
    injector.start()
    t0 = time.time()
    try:
        with pytest.raises(ReplicaError, match=f"{state}: rank {victim['rank']} \\(expert shard {victim['shard']}\\)"):
            llm.generate(prompts, SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
        assert time.time() - t0 < 1.5 + timeout_s + 5 + 10
        # the router outlives the shard: its steps before the kill ran split, or not at all
        split = ray.get(llm.replica.routers[0].stats.remote(), timeout=30)["ping_pong_steps"]
        assert split > 0 if ping_pong else split == 0, split
        t1 = time.time()
        llm.shutdown()   # kills a stopped process too
        assert time.time() - t1 < 15
    finally:
        injector.cancel()
        if fault == signal.SIGSTOP:
            try:
                os.kill(victim["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
    if fault == signal.SIGKILL:   # one rebuild is enough to show it
        with LLM(model=ckpt, dtype="float32", num_expert_shards=2, ping_pong=ping_pong) as rebuilt:
            assert [o.outputs[0].token_ids for o in rebuilt.generate(prompts, greedy)] == want


# ---- the exchange alone: one process per rank, a real gloo group, tensors followed as device-resident ----------

# Issue 16: the split sizes of a variable-size all_to_all must be on the host, so each rank reads them once per
# MoE layer (the counts it sends and receives, in one transfer); nothing else may wait on the device.
SYNCS_PER_MOE_LAYER = 1
EXCHANGE = {"routers": 1, "shards": 2, "layers": 3, "experts": 8, "hidden": 16, "inter": 8, "tokens": 5, "topk": 2,
            "steps": 3}
STATIC_STEPS = {1, 2}  # steps the router routes with fixed-capacity dispatch (a fixed-shape decode step)
PING_PONG_STEPS = {2}  # of them, the steps it routes as two micro-batches, both started before either is waited for
# The exchange regroups each token's K expert rows (by shard, then expert) before summing them: fp32 sums in
# another order differ in the last bits; outputs here are O(1).
EXCHANGE_ATOL = 1e-5


def _exchange_experts(layer: int, ids) -> dict:
    """Plain fp32 experts {id: (w1, w2, w3)} of one layer, the same in every process (seeded by layer, expert)."""
    from v4ray.kernels.quant import QuantTensor

    c, out = EXCHANGE, {}
    for e in ids:
        g = torch.Generator().manual_seed(1000 * layer + e)
        shapes = [(c["inter"], c["hidden"]), (c["hidden"], c["inter"]), (c["inter"], c["hidden"])]
        out[e] = tuple(QuantTensor(torch.randn(*s, generator=g) / s[1] ** 0.5) for s in shapes)
    return out


def _exchange_inputs(step: int, layer: int):
    """One MoE layer's router input: x [N, D], routing weights and expert ids [N, K] (distinct per token)."""
    c = EXCHANGE
    g = torch.Generator().manual_seed(100 * step + layer)
    x = torch.randn(c["tokens"], c["hidden"], generator=g)
    idx = torch.stack([torch.randperm(c["experts"], generator=g)[:c["topk"]] for _ in range(c["tokens"])])
    return x, torch.rand(c["tokens"], c["topk"], generator=g), idx


def _exchange_rank(rank: int) -> dict:
    """One rank of the exchange under a Provenance mode: the router routes every layer of EXCHANGE["steps"] steps
    and then one idle step; each shard serves them. Reports per-window event counts (and the router its outputs)."""
    from v4ray.actors.expert_parallel import RouterExchange, ShardServer

    c = EXCHANGE
    world, R = c["routers"] + c["shards"], c["routers"]
    placement = ExpertPlacement.contiguous(c["experts"], c["shards"])
    report = {"rank": rank, "windows": {}, "outputs": []}
    with Provenance() as prov, kernels_as_device_ops(prov):
        if rank < R:
            exchange = RouterExchange(rank, world, R, placement, c["hidden"], device=DEVICE)
            for step in range(c["steps"]):
                for layer in range(c["layers"]):
                    x, w, idx = (to_device(t) for t in _exchange_inputs(step, layer))
                    with prov.window(f"step {step} layer {layer}") as win:
                        if step in PING_PONG_STEPS:   # rows 0..2, then 3..4
                            started = [exchange.start(x[rows], w[rows], idx[rows]) for rows in (slice(0, 3),
                                                                                                   slice(3, None))]
                            y = torch.cat([exchange.finish(f) for f in started])
                        else:
                            y = exchange.route(layer, x, w, idx, static=step in STATIC_STEPS)
                    report["outputs"].append(y.inner.tolist())   # no tensors through the queue: the rank exits
                    report["windows"][win.name] = win
            with prov.window("idle step") as win:
                exchange.idle(c["layers"])
            report["windows"][win.name] = win
        else:
            mine = placement.shard_experts(rank - R)
            experts = [{e: tuple(type(t)(to_device(t.data)) for t in ws)
                        for e, ws in _exchange_experts(layer, mine).items()} for layer in range(c["layers"])]
            server = ShardServer(world, c["hidden"], experts, torch.float32, 10.0, device=DEVICE)
            for step in range(c["steps"] + 1):
                with prov.window(f"step {step}") as win:
                    server.serve_step(2 if step in PING_PONG_STEPS else 1)
                report["windows"][win.name] = win
            report["tokens_per_expert"] = server.tokens_per_expert()
    return report


def _rank_main(rank: int, world: int, addresses, results, body, *args) -> None:
    """A spawned rank: join the group (rank 0 hosts the rendezvous and puts its address once per other rank), run
    body(rank, *args) -> its report, whose Provenance windows travel as event counts and a summary."""
    try:
        _join_group(rank, world, addresses)
        report = body(rank, *args)
        report["windows"] = {name: {k: w.count(k) for k in ("sync", "upload", "mix")} | {"summary": w.summary()}
                             for name, w in report["windows"].items()}
        results.put(report)
    except BaseException as e:  # the parent names the rank and the error
        results.put({"rank": rank, "error": repr(e)})
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn_ranks(body, world: int, *args, timeout_s: float = 240) -> dict[int, dict]:
    """Run body(rank, *args) in `world` spawned processes joined in one gloo group (`_rank_main`) -> each rank's
    report; a rank that fails or never reports (within timeout_s) fails the test with its name."""
    ctx = multiprocessing.get_context("spawn")
    addresses, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, addresses, results, body, *args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = {}
        for _ in range(world):
            try:
                rep = results.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(reports))} never reported; exit codes "
                                     f"{[p.exitcode for p in procs]}") from None
            reports[rep["rank"]] = rep
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    errors = {r: rep["error"] for r, rep in reports.items() if "error" in rep}
    assert not errors, f"ranks failed: {errors}"
    return reports


def _join_group(rank: int, world: int, addresses) -> None:
    from v4ray.actors.expert_parallel import init_group, rendezvous_listener, tcp_address

    if rank == 0:
        listener = rendezvous_listener("127.0.0.1")
        address = tcp_address("127.0.0.1", listener.getsockname()[1])
        for _ in range(world - 1):
            addresses.put(address)
        init_group(address, rank, world, 60, listener=listener, device="cpu")
    else:
        init_group(addresses.get(timeout=60), rank, world, 60, device="cpu")


def test_backend_follows_the_device():
    from v4ray.actors.expert_parallel import backend_for, init_group

    assert backend_for(torch.device("cuda", 0)) == "nccl"   # whether or not this process sees a GPU
    assert backend_for(torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="backend='nccl' cannot exchange tensors on cpu"):
        init_group("tcp://127.0.0.1:1", 1, 2, 1.0, device="cpu", backend="nccl")   # refused before connecting


def test_exchange_syncs_once_per_moe_layer_per_rank():
    """1 router + 2 shards in separate processes over gloo; inputs, expert weights and every buffer the exchange
    makes are followed as device-resident: per MoE layer (and micro-batch) each rank makes at most
    SYNCS_PER_MOE_LAYER device->host reads, no upload and no host/device mix, and the routed outputs equal the
    single-process expert compute. In STATIC_STEPS the router dispatches with fixed capacity (a decode step's
    exchange, in PING_PONG_STEPS as two micro-batches in flight at once), and when idle it sends empty fixed-capacity
    blocks: in both it reads nothing back."""
    from v4ray.kernels.moe import expert_mlp_ref
    from v4ray.model.v4 import combine_rows, group_rows

    c = EXCHANGE
    world, L = c["routers"] + c["shards"], c["layers"]
    reports = _spawn_ranks(_exchange_rank, world)

    for rank, rep in reports.items():
        for name, counts in rep["windows"].items():
            step = int(name.split()[1]) if name.startswith("step") else None
            layers = L if step is not None and rank >= c["routers"] or name == "idle step" else 1
            micro_batches = 2 if step in PING_PONG_STEPS and rank >= c["routers"] else 1
            detail = f"rank {rank} {name}:\n{counts['summary']}"
            assert counts["upload"] == 0 and counts["mix"] == 0, detail
            if rank < c["routers"] and (step in STATIC_STEPS or name == "idle step"):
                assert counts["sync"] == 0, detail   # fixed capacity: the router reads nothing back
                continue
            assert counts["sync"] <= SYNCS_PER_MOE_LAYER * layers * micro_batches, detail
            assert counts["sync"] >= 1, detail   # the split sizes are read: the count is real, not vacuous

    experts = [_exchange_experts(layer, range(c["experts"])) for layer in range(L)]
    want = []
    for step in range(c["steps"]):
        for layer in range(L):
            x, w, idx = _exchange_inputs(step, layer)
            order, tok = group_rows(idx)
            y = expert_mlp_ref(x[tok], idx.reshape(-1)[order], w.reshape(-1)[order], experts[layer], 10.0)
            want.append(combine_rows(order, y, idx.shape[1]))
    for i, (got, ref) in enumerate(zip(reports[0]["outputs"], want, strict=True)):
        torch.testing.assert_close(torch.tensor(got), ref, atol=EXCHANGE_ATOL, rtol=0, msg=f"step/layer {i}")
    served = [sum(sum(reports[r]["tokens_per_expert"][layer].values()) for r in range(1, world)) for layer in range(L)]
    assert served == [c["steps"] * c["tokens"] * c["topk"]] * L


ROUTER_STEP = {"shards": 2, "seqs": 3, "decode_steps": 3}


def _router_step_rank(rank: int, ckpt: str, micro_batches: int) -> dict:
    """One rank of a 1-router / 2-shard replica of the tiny model, run as its actors run it but in plain processes
    under a Provenance mode: the router's EngineCore takes a prefill step, then fixed-shape decode steps (the
    expert-parallel form: fixed-capacity dispatch, uncompiled), every MoE layer's exchange `micro_batches` times
    (2: ping-pong); each shard serves every step. Reports per-step event counts (and the router its tokens)."""
    from v4ray.actors.expert_parallel import RouterExchange, ShardServer
    from v4ray.engine.core import EngineCore
    from v4ray.engine.runner import ModelRunner
    from v4ray.model.config import V4Config
    from v4ray.model.loader import load_expert_weights, load_model
    from v4ray.model.tokenizer import V4Tokenizer

    from device_provenance import mark_device

    c = ROUTER_STEP
    world, steps = 1 + c["shards"], 1 + c["decode_steps"]
    cfg = V4Config.from_file(ckpt)
    placement = ExpertPlacement.contiguous(cfg.n_routed_experts, c["shards"])
    report = {"rank": rank, "windows": {}}
    with Provenance() as prov, kernels_as_device_ops(prov):
        if rank == 0:
            exchange = RouterExchange(0, world, 1, placement, cfg.hidden_size, device=DEVICE)
            model = mark_device(load_model(ckpt, torch.float32, expert_range=(0, 0), expert_backend=exchange))
            runner = ModelRunner(model, 64 << 20, c["seqs"], decode_step="static")
            exchange.micro_batches = micro_batches
            core = EngineCore(runner, V4Tokenizer.from_dir(ckpt), 4096, 4096, c["seqs"])
            params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
            for i in range(c["seqs"]):
                core.add_request(f"r{i}", parity_prompt(60 + 9 * i, seed=i).tolist(), params)
            outputs = []
            for step in range(steps):
                with prov.window(f"step {step}") as win:
                    outputs += core.step()
                report["windows"][win.name] = win
            report["tokens"] = {o.request_id: o.outputs[0].token_ids for o in outputs if o.finished}
            report["errors"] = [o.error for o in outputs if o.error]
        else:
            ids = placement.shard_experts(rank - 1)
            experts = [{e: tuple(type(t)(to_device(t.data)) for t in ws) for e, ws in layer.items()}
                       for layer in load_expert_weights(ckpt, ids, torch.float32, True, cfg)]
            server = ShardServer(world, cfg.hidden_size, experts, torch.float32, cfg.swiglu_limit, device=DEVICE)
            for step in range(steps):
                with prov.window(f"step {step}") as win:
                    server.serve_step(micro_batches)
                report["windows"][win.name] = win
    return report


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_router_decode_step_reads_back_once_and_nothing_in_its_layers(tiny_ckpt, micro_batches):
    """The whole decode step of an expert-parallel router, not only its exchange: 1 router + 2 shards in separate
    processes over gloo, the router's weights and cache device-resident. A fixed-shape decode step reads the
    device back once (its sampled tokens: MAX_SYNCS_PER_DECODE_STEP) with no upload beyond its inputs and no
    host/device mix; the prefill step reads each MoE layer's split sizes; the shards read their split sizes per
    layer and micro-batch; and the greedy tokens equal the single-process engine's — with ping-pong too
    (micro_batches 2: the decode batch of 3 runs as halves of 2 and 1 rows, the prefill as one batch and an empty
    one)."""
    ckpt = tiny_ckpt("v4-tiny")
    c = ROUTER_STEP
    moe_layers = load_preset("v4-tiny").num_hidden_layers
    reports = _spawn_ranks(_router_step_rank, 1 + c["shards"], str(ckpt), micro_batches)
    router = reports[0]
    assert not router["errors"], router["errors"]
    for name, counts in router["windows"].items():
        detail = f"router {name}:\n{counts['summary']}"
        assert counts["mix"] == 0, detail
        if name == "step 0":   # prefill: variable splits, read per MoE layer, plus the sampled tokens
            assert 1 + moe_layers <= counts["sync"] <= SYNCS_PER_MOE_LAYER * moe_layers + 1, detail
        else:
            assert counts["sync"] == MAX_SYNCS_PER_DECODE_STEP, detail
            assert counts["upload"] <= 1, detail   # the step's inputs, one copy into the bucket's buffer
    for rank in range(1, 1 + c["shards"]):
        for name, counts in reports[rank]["windows"].items():
            detail = f"shard rank {rank} {name}:\n{counts['summary']}"
            assert counts["upload"] == 0 and counts["mix"] == 0, detail
            assert 1 <= counts["sync"] <= SYNCS_PER_MOE_LAYER * moe_layers * micro_batches, detail
    # the same tokens as one process
    core = _local_engine(ckpt)
    params = SamplingParams(max_tokens=1 + c["decode_steps"], temperature=0.0, ignore_eos=True)
    for i in range(c["seqs"]):
        core.add_request(f"r{i}", parity_prompt(60 + 9 * i, seed=i).tolist(), params)
    want = {}
    while core.has_work():
        want.update({o.request_id: o.outputs[0].token_ids for o in core.step() if o.finished})
    assert router["tokens"] == want


COMPILED_ROUTER = {"shards": 2, "seqs": 3, "decode_steps": 6}
# v4-tiny's router graphs: the StepBatch regions without the MoE sublayer (attention in and out at 1 row and at any
# count, the prefill attention alone and with the CSA indexer: 6), the Sinkhorn op's graph (1 row, any count: 2), the
# compressors' emit per kind (CSA, its indexer's, HCA: 3), a banded group's attention alone (every layer kind) and with
# the CSA indexer: 2, a stack of groups' attention alone and with the CSA indexer: 2, the layer up to its exchange per
# layer kind (SWA with hash routing, CSA, HCA) and bucket kind (B = 1, B >= 2): 6, the layer after its exchange per
# bucket kind: 2.
COMPILED_ROUTER_GRAPHS = 6 + 2 + 3 + 2 + 2 + 6 + 2


def _compiled_router_rank(rank: int, ckpt: str, ready) -> dict:
    """One rank of a 1-router / 2-shard replica in plain processes, the router's decode steps compiled as an actor
    compiles them (`DecodeGraphs` with remote experts: the graphs between the exchanges, compiled alone at start
    with dry exchanges). The shards wait for `ready` before serving: a cold compile outlasts a collective's
    timeout, as it does in `Router.start`, before any rank steps."""
    from torch._dynamo.utils import counters

    from v4ray.actors.expert_parallel import RouterExchange, ShardServer
    from v4ray.engine.core import EngineCore
    from v4ray.engine.runner import ModelRunner
    from v4ray.model.config import V4Config
    from v4ray.model.loader import load_expert_weights, load_model
    from v4ray.model.tokenizer import V4Tokenizer

    c = COMPILED_ROUTER
    world, steps = 1 + c["shards"], 1 + c["decode_steps"]
    cfg = V4Config.from_file(ckpt)
    placement = ExpertPlacement.contiguous(cfg.n_routed_experts, c["shards"])
    report = {"rank": rank, "windows": {}}
    if rank == 0:
        torch._dynamo.config.disable = False   # the suite turns compilation off; this router is about it
        exchange = RouterExchange(0, world, 1, placement, cfg.hidden_size)
        model = load_model(ckpt, torch.float32, expert_range=(0, 0), expert_backend=exchange)
        runner = ModelRunner(model, 64 << 20, c["seqs"], decode_step="compiled")
        ready.set()
        report["compiled"] = runner.graphs is not None and runner.graphs.compiled and runner.graphs.remote
        core = EngineCore(runner, V4Tokenizer.from_dir(ckpt), 4096, 4096, c["seqs"])
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        for i in range(c["seqs"]):
            core.add_request(f"r{i}", parity_prompt(60 + 9 * i, seed=i).tolist(), params)
        outputs = []
        for step in range(steps):
            exchange.micro_batches = _micro_batches(step)
            outputs += core.step()
        report["tokens"] = {o.request_id: o.outputs[0].token_ids for o in outputs if o.finished}
        report["graphs"] = counters["stats"]["unique_graphs"]
        report["cache_bypass"] = counters["inductor"]["fxgraph_cache_bypass"]   # graphs the disk cache cannot keep
        report["ping_pong_steps"] = exchange.ping_pong_steps
    else:
        ready.wait(600)
        ids = placement.shard_experts(rank - 1)
        server = ShardServer(world, cfg.hidden_size, load_expert_weights(ckpt, ids, torch.float32, True, cfg),
                             torch.float32, cfg.swiglu_limit)
        for step in range(steps):
            server.serve_step(_micro_batches(step))
    return report


def _micro_batches(step: int) -> int:
    """The compiled router test's steps alternate between one micro-batch and two (ping-pong)."""
    return 1 + step % 2


@pytest.mark.timeout(900)  # a cold compile of the router's graphs: a few minutes on 2 cores
def test_a_compiled_router_decode_step_gives_the_single_process_tokens(tiny_ckpt):
    """The expert-parallel router's decode step compiled on the CPU as graphs between its exchanges (the exchanges
    run eagerly), its steps alternating between one batch and two ping-ponged halves (2 rows and 1): greedy tokens
    equal the single-process engine's (a flip allowed only at a near-tie of the reference), every graph compiled
    at start-up and none while serving (the halves run on the same graphs), the layers of a kind sharing theirs."""
    ckpt = tiny_ckpt("v4-tiny")
    c = COMPILED_ROUTER
    ready = multiprocessing.get_context("spawn").Event()
    router = _spawn_ranks(_compiled_router_rank, 1 + c["shards"], str(ckpt), ready, timeout_s=600)[0]
    assert router["compiled"]
    assert router["graphs"] == COMPILED_ROUTER_GRAPHS, router["graphs"]
    assert router["cache_bypass"] == 0, router["cache_bypass"]   # a restart takes every graph from the disk cache
    assert router["ping_pong_steps"] == c["decode_steps"] // 2, router["ping_pong_steps"]
    core = _local_engine(ckpt)
    params = SamplingParams(max_tokens=1 + c["decode_steps"], temperature=0.0, ignore_eos=True, logprobs=2)
    for i in range(c["seqs"]):
        core.add_request(f"r{i}", parity_prompt(60 + 9 * i, seed=i).tolist(), params)
    want = {}
    while core.has_work():
        want.update({o.request_id: o.outputs[0] for o in core.step() if o.finished})
    for rid, ref in want.items():
        got = router["tokens"][rid]
        for t, (a, b) in enumerate(zip(ref.token_ids, got)):
            if a != b:   # only where the reference's top two were a near-tie
                top2 = sorted((lp.logprob for lp in ref.logprobs[t].values()), reverse=True)[:2]
                assert top2[0] - top2[1] < TIE_GAP, (rid, t)
                break
        else:
            assert len(got) == len(ref.token_ids), rid


def test_the_backend_binds_to_the_interface_of_the_node_address(monkeypatch):
    """gloo/NCCL connect through the interface holding Ray's node address (tests/test_hosts.py shows the group
    forming across network namespaces, where the host name resolves to loopback); an operator's choice wins."""
    from v4ray.actors.expert_parallel import bind_to_address, interface_of

    assert interface_of("127.0.0.1") == "lo" and interface_of("192.0.2.254.1") is None
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")   # unset for the call, restored after the test
    assert bind_to_address("gloo", "127.0.0.1") == "lo" and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")
    assert bind_to_address("nccl", "127.0.0.1") is None and os.environ["NCCL_SOCKET_IFNAME"] == "eth9"
