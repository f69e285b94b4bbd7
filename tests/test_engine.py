"""The engine: continuous batching with random arrivals, preemption under memory pressure, aborts, seeded
sampling, and the async streaming API — against requests run alone (the naive reference)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
import torch

from v4ray.engine.core import EngineCore
from v4ray.kernels import native_cpu
from v4ray.model.kv_format import kv_bytes
from v4ray.model.loader import load_model
from v4ray.engine.runner import ModelRunner
from v4ray.engine.sampling import SamplingParams
from v4ray.model.tokenizer import V4Tokenizer

from conftest import parity_prompt
from test_parity import TIE_GAP


def _core(ckpt, kv_cache_bytes=64 << 20, max_num_seqs=32, budget=512):
    model = load_model(ckpt, torch.float32)
    runner = ModelRunner(model, kv_cache_bytes, max_num_seqs)
    return EngineCore(runner, V4Tokenizer.from_dir(ckpt), 4096, budget, max_num_seqs)


def _drain(core, pending=None, seed=0):
    """Step until done, adding `pending` requests (rid, ids, params) at random steps."""
    rng = random.Random(seed)
    pending = list(pending or [])
    final = {}
    while pending or core.has_work():
        while pending and (not core.has_work() or rng.random() < 0.3):
            core.add_request(*pending.pop(0))
        for out in core.step():
            if out.finished:
                final[out.request_id] = out
    return final


def _alone(ckpt, ids, params):
    core = _core(ckpt)
    core.add_request("x", ids, params)
    return _drain(core)["x"]


def _same_or_tie(a, b, ref_logprobs):
    """Greedy token lists must agree; a first divergence is allowed only at a genuine tie."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            gap = ref_logprobs[i][y].logprob - min(e.logprob for e in ref_logprobs[i].values())
            top = sorted(ref_logprobs[i].values(), key=lambda e: -e.logprob)
            assert top[0].logprob - top[1].logprob < TIE_GAP, f"diverged at {i} with gap {gap}"
            return
    assert len(a) == len(b)


GREEDY = dict(temperature=0, logprobs=2, ignore_eos=True)


def _workload(n, seed):
    rng = random.Random(seed)
    return [(f"r{i}", parity_prompt(rng.randint(1, 300), seed=100 + i).tolist(),
             SamplingParams(max_tokens=rng.randint(1, 24), **GREEDY)) for i in range(n)]


def test_random_arrivals_on_a_distributed_replica_equal_requests_alone(ray_session, tiny_ckpt):
    from v4ray.cluster.replica import Replica, ReplicaConfig, ReplicaEngine
    from v4ray.engine.config import EngineConfig

    ckpt = tiny_ckpt("v4-tiny")
    work = _workload(10, seed=1)
    rep = Replica(ReplicaConfig(EngineConfig(model=str(ckpt), num_routers=2, num_expert_shards=2,
                                             max_num_batched_tokens=256))).start()
    try:
        engine = ReplicaEngine(rep)
        final = _drain(engine, work, seed=2)
        stats = rep.stats()
    finally:
        rep.shutdown()
    assert all(r["engine"]["steps"] > 0 for r in stats["routers"])  # both routers served requests
    for rid, ids, params in work:
        alone = _alone(ckpt, ids, params).outputs[0]
        _same_or_tie(final[rid].outputs[0].token_ids, alone.token_ids, alone.logprobs)


def test_preemption_under_memory_pressure_loses_nothing(tiny_ckpt):
    ckpt = tiny_ckpt("v4-tiny-pro")
    # prompts just under one 256-token block that cross into a second block while decoding
    work = [(f"r{i}", parity_prompt(236 + 3 * i, seed=200 + i).tolist(), SamplingParams(max_tokens=26, **GREEDY))
            for i in range(6)]
    free = _drain(_core(ckpt), work)
    cfg = load_model(ckpt, torch.float32).cfg
    kb = kv_bytes(cfg, "fp32")
    tight = _core(ckpt, kv_cache_bytes=5 * kb.fixed_per_seq + 4 * kb.per_block, max_num_seqs=4)
    squeezed = _drain(tight, work)
    assert tight.scheduler.num_preemptions > 0
    for rid, _, _ in work:
        _same_or_tie(squeezed[rid].outputs[0].token_ids, free[rid].outputs[0].token_ids, free[rid].outputs[0].logprobs)
    cache = tight.runner.cache
    assert cache.blocks.num_free == cache.blocks.num and cache.slots.num_free == cache.slots.num


def test_abort_returns_pools_and_queues_to_baseline(tiny_ckpt):
    core = _core(tiny_ckpt("v4-tiny"), max_num_seqs=32, budget=1024)
    cache = core.runner.cache
    baseline = (cache.blocks.num_free, cache.slots.num_free)
    for i in range(32):
        core.add_request(f"r{i}", parity_prompt(20 + 7 * i, seed=i).tolist(), SamplingParams(max_tokens=50, **GREEDY))
    while any(s.num_computed < s.num_tokens - 1 for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()                                   # until all 32 are decoding
    assert len(core.scheduler.running) == 32 and not core.scheduler.waiting
    aborted = [f"r{i}" for i in range(0, 32, 3)][:10]
    for rid in aborted:
        assert core.abort(rid)
    final = _drain(core)
    assert set(final) == {f"r{i}" for i in range(32)} - set(aborted)
    assert not core.scheduler.running and not core.scheduler.waiting and not core.requests
    assert (cache.blocks.num_free, cache.slots.num_free) == baseline


def test_seeded_sampling_is_independent_of_batch_composition(tiny_ckpt):
    ckpt = tiny_ckpt("v4-tiny", confident=True)
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=42, presence_penalty=0.5,
                       repetition_penalty=1.1, n=2)
    ids = parity_prompt(40, seed=7).tolist()
    alone = _alone(ckpt, ids, p)
    core = _core(ckpt)
    others = [(f"o{i}", parity_prompt(30 + i, seed=i).tolist(), SamplingParams(max_tokens=8, temperature=1.0))
              for i in range(5)]
    final = _drain(core, others[:2] + [("me", ids, p)] + others[2:], seed=4)
    assert [o.token_ids for o in final["me"].outputs] == [o.token_ids for o in alone.outputs]


def test_fair_steps_bound_the_rows_keep_narrow_requests_moving_and_change_no_output(tiny_ckpt):
    """max_step_rows: no step advances more running sequences than the bound, a narrow request sits out at most
    one step in a row (when requests left out FAIR_MAX_SKIP_STEPS steps go first), a wide one at most
    FAIR_MAX_SKIP_STEPS plus one step per other wide request overdue with it, and every output (seeded n > 1
    included) equals the unbounded engine's."""
    from v4ray.engine.scheduler import FAIR_MAX_SKIP_STEPS

    ckpt = tiny_ckpt("v4-tiny", confident=True)
    wide = [(f"w{i}", parity_prompt(20 + i, seed=i).tolist(),
             SamplingParams(max_tokens=24, temperature=1.0, seed=i, n=4, logprobs=3, ignore_eos=True))
            for i in range(4)]
    narrow = [(f"s{i}", parity_prompt(12 + i, seed=10 + i).tolist(),
               SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)) for i in range(3)]
    work = wide[:2] + narrow[:1] + wide[2:] + narrow[1:]

    def run(max_step_rows: int):
        core = _core(ckpt)
        core.scheduler.max_step_rows = max_step_rows
        for r in work:
            core.add_request(*r)
        final, steps = {}, []
        while core.has_work():
            before = {s.request_id: len(s.seq.output_token_ids) for s in core.scheduler.running}
            outs = core.step()
            advanced = {s.request_id for s in core.scheduler.running
                        if len(s.seq.output_token_ids) > before.get(s.request_id, -1)}
            advanced |= {o.request_id for o in outs if o.finished}
            steps.append((set(before), advanced, sum(n for rid, n in before.items())))
            final.update({o.request_id: o for o in outs if o.finished})
        return final, steps

    unbounded, _ = run(0)
    bounded, steps = run(6)
    assert {k: [c.token_ids for c in o.outputs] for k, o in bounded.items()} == \
        {k: [c.token_ids for c in o.outputs] for k, o in unbounded.items()}
    skipped: dict[str, int] = {}
    decode_steps = [(running, advanced) for running, advanced, _ in steps if running]
    assert len(decode_steps) > len(steps) // 2
    worst = {"s": 0, "w": 0}
    for running, advanced in decode_steps:
        for rid in running:
            skipped[rid] = 0 if rid in advanced else skipped.get(rid, 0) + 1
            worst[rid[0]] = max(worst[rid[0]], skipped[rid])
    assert worst["s"] <= 1 and 1 <= worst["w"] <= FAIR_MAX_SKIP_STEPS + len(wide) - 1, worst
    # the bound held: each step advanced at most 6 sequences (the wide requests have 4 each, the narrow 1)
    rows = [sum(4 if r.startswith("w") else 1 for r in advanced & running) for running, advanced in decode_steps]
    assert max(rows) <= 6 and min(rows) >= 1


def test_async_engine_streams_and_aborts(tiny_ckpt):
    from v4ray.serve.async_engine import AsyncEngine

    core = _core(tiny_ckpt("v4-tiny-swa"))
    engine = AsyncEngine(core)

    async def main():
        ids = parity_prompt(30).tolist()
        seen = []
        async for out in engine.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)):
            seen.append(len(out.outputs[0].token_ids))
        assert seen[-1] == 6 and seen == sorted(seen) and len(seen) >= 2

        async def stop_early():
            async for out in engine.generate(ids, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)):
                if len(out.outputs[0].token_ids) >= 3:
                    break  # like a client disconnecting

        await asyncio.gather(*[stop_early()] + [asyncio.sleep(0)])
        for _ in range(100):
            if not core.has_work():
                break
            await asyncio.sleep(0.02)
        assert not core.has_work() and not core.requests

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    cache = core.runner.cache
    assert cache.blocks.num_free == cache.blocks.num


# ---- one device->host transfer per step (issue 16; docs/architecture.md §11) ---------------------------------
# The model's weights are tagged device-resident (tests/device_provenance.py), so the runner's logits and
# everything sampling derives from them are too. Only the engine's half is asserted here — events raised from
# engine/core.py, sampling.py and sequence.py; tests/test_device_provenance.py asserts the whole step.
ENGINE_FILES = ("engine/core.py", "engine/sampler.py", "engine/sequence.py")
NUM_SEQS, DECODE_STEPS = 8, 3
SYNCS_PER_STEP = 1  # the chosen tokens, with their logprobs (and the draws' validity) in the same transfer
PROVENANCE_CASES = {
    "greedy": [dict(temperature=0)] * NUM_SEQS,
    "sampled": [dict(temperature=0.8, top_p=0.9, top_k=20, seed=i) for i in range(NUM_SEQS)],
    "logprobs": [dict(temperature=0, logprobs=5)] * (NUM_SEQS // 2)
                + [dict(temperature=0.8, top_k=20, seed=i, logprobs=5) for i in range(NUM_SEQS // 2)],
    "shaped": [dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5),
               dict(temperature=0.9, repetition_penalty=0.8, logit_bias={5: 3.0, 40: -2.0}, seed=3, n=2),
               dict(temperature=0, min_tokens=DECODE_STEPS + 1, stop_token_ids=[100, 101], logprobs=0),
               dict(temperature=1.0, min_p=0.1, min_tokens=2, seed=5, logprobs=3),
               dict(temperature=0.7, top_p=0.5), dict(temperature=0, logit_bias={60: 5.0}),
               dict(temperature=1.2, frequency_penalty=-1.0, seed=9)],  # 8 sequences (one request has n=2)
}


def _engine_events(window, kind: str) -> list:
    return [e for e in window.of(kind) if e.where.split(":")[0] in ENGINE_FILES]


def _provenance_steps(ckpt, cases: list[dict], tagged: bool = True):
    """Run the requests (8 sequences, prompts of 30 + 7i tokens) with the weights tagged device-resident under the
    provenance mode, or plainly; -> (per-step windows, final outputs). The global generator (unseeded rows)
    starts from the same state either way."""
    from device_provenance import Provenance, kernels_as_device_ops, mark_device

    torch.manual_seed(0)
    prov = Provenance()
    # the same formulation both ways: tagged tensors say they live on a device, where the routed experts and the
    # decode attention run as torch ops; plain CPU tensors would take the native CPU kernels (kernels/moe_cpu.py,
    # kernels/attention_cpu.py), equal within ulps only
    native_cpu.ENABLED = tagged
    try:
        with prov if tagged else contextlib.nullcontext(), kernels_as_device_ops(prov) if tagged else contextlib.nullcontext():
            model = load_model(ckpt, torch.float32)
            model = mark_device(model) if tagged else model
            core = EngineCore(ModelRunner(model, 64 << 20, NUM_SEQS), V4Tokenizer.from_dir(ckpt), 4096, 4096, NUM_SEQS)
            for i, kw in enumerate(cases):
                core.add_request(f"r{i}", parity_prompt(30 + 7 * i, seed=i).tolist(),
                                 SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True, **kw))
            steps, final = [], {}
            while core.has_work():
                with prov.window(f"step {len(steps)}") as w:
                    for out in core.step():
                        final[out.request_id] = out
                steps.append(w)
    finally:
        native_cpu.ENABLED = True
    return steps, final


@pytest.mark.parametrize("case", list(PROVENANCE_CASES))
def test_a_step_reads_the_device_back_once(tiny_ckpt, case):
    """8 sequences: every decode step, and the prefill step, reads back exactly one packed result from sampling
    and uploads nothing (penalty state went up when the requests arrived); the outputs equal those of the same
    requests run on plain CPU tensors."""
    ckpt = tiny_ckpt("v4-tiny-swa")
    steps, final = _provenance_steps(ckpt, PROVENANCE_CASES[case])
    assert len(steps) == 1 + DECODE_STEPS + 1  # prefill, then one token per step
    for w in steps:
        assert len(_engine_events(w, "sync")) == SYNCS_PER_STEP, f"{w.name}: device->host reads\n{w.summary()}"
        assert not _engine_events(w, "upload") and not _engine_events(w, "mix"), f"{w.name}\n{w.summary()}"
    _, plain = _provenance_steps(ckpt, PROVENANCE_CASES[case], tagged=False)
    assert final.keys() == plain.keys() and all(o.error is None for o in final.values())
    for rid, out in final.items():
        assert [(c.token_ids, c.cumulative_logprob, c.logprobs) for c in out.outputs] == \
            [(c.token_ids, c.cumulative_logprob, c.logprobs) for c in plain[rid].outputs], rid


def test_prompt_logprobs_add_one_transfer_per_request_to_the_prefill_step(tiny_ckpt):
    steps, final = _provenance_steps(tiny_ckpt("v4-tiny-swa"), [dict(temperature=0, prompt_logprobs=2)] * 2
                                     + [dict(temperature=0)] * 6)
    prefill, *decode = steps
    assert len(_engine_events(prefill, "sync")) == SYNCS_PER_STEP + 2, prefill.summary()
    assert all(len(_engine_events(w, "sync")) == SYNCS_PER_STEP for w in decode)
    assert all(not _engine_events(w, "upload") for w in steps)
    assert len(final["r0"].prompt_logprobs) == 30 and len(final["r1"].prompt_logprobs) == 37


def test_plain_greedy_decode_steps_take_the_picks_of_the_steps_graph(tiny_ckpt):
    """A decode step whose rows are all plain greedy reads back the picks its fixed-shape step computed
    (`greedy_picks`) instead of sampling the logits again: the same tokens and cumulative logprobs, bit for bit,
    as the same requests asking for logprobs (which go through `SamplingBatch` on the same logits)."""
    ckpt = tiny_ckpt("v4-tiny")
    prompts = [parity_prompt(20 + 9 * i, seed=70 + i).tolist() for i in range(5)]
    runs = {}
    for name, extra in (("picks", {}), ("sampled", {"logprobs": 0})):
        runner = ModelRunner(load_model(ckpt, torch.float32), 64 << 20, 8, decode_step="static")
        core = EngineCore(runner, V4Tokenizer.from_dir(ckpt), 4096, 512, 8)
        for i, ids in enumerate(prompts):
            core.add_request(f"r{i}", ids, SamplingParams(max_tokens=6 + i, temperature=0, ignore_eos=True, **extra))
        core.step()                                           # the prefill: no graph, no picks
        assert runner.greedy_picks is None
        core.step()                                           # a decode step of the fixed-shape graph
        assert runner.greedy_picks is not None and runner.greedy_picks.shape == (5, 2)
        runs[name] = _drain(core)
    assert runs["picks"].keys() == runs["sampled"].keys()
    for rid, out in runs["picks"].items():
        a, b = out.outputs[0], runs["sampled"][rid].outputs[0]
        assert a.token_ids == b.token_ids and a.cumulative_logprob == b.cumulative_logprob, rid
