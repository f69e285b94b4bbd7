"""The fixed-shape decode step (model/v4.py `V4Model.decode`, engine/graphs.py): the same tokens as the eager
`StepBatch` step, whatever the bucket, and free of graph breaks and host syncs (a `fullgraph=True` compile is
the CPU's proof of CUDA-graph readiness).

Greedy tokens must be identical. Where two logits are a genuine near-tie (top-2 gap below NEAR_TIE) a flip is
reported, not failed: the paths sum in different orders (dense experts vs. sorted rows, batch widths), which moves
logits by ~1e-6 in fp32 (measured: at most 2.4e-6 over 40 steps on every preset).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from v4ray.engine.core import EngineCore
from v4ray.engine.runner import ModelRunner
from v4ray.engine.sampling import SamplingParams
from v4ray.model.config import HCA, V4Config, load_preset
from v4ray.model.kv_cache import DecodeBatch, DecodeInputs, PagedKVCache, StepBatch
from v4ray.model.loader import load_model
from v4ray.model.tokenizer import V4Tokenizer

from conftest import PARITY_PRESETS, parity_prompt

NEAR_TIE = 1e-4          # top-2 logit gap under which a flipped argmax is a tie, not a bug (50x the measured drift)
LOGIT_TOL = 1e-4         # fp32 |eager - static| bound on any logit: the same drift, with the same margin
DECODE_STEPS = 40
PROMPT_LENS = [130, 7, 300, 255]  # across CSA windows, the HCA window of 128, the sliding window, a block edge


def _rates_4_24() -> V4Config:
    d = load_preset("v4-tiny").to_hf_dict()
    d.pop("compress_ratios")
    d["compress_rates"] = {**d["compress_rates"], HCA: 24}
    return V4Config.from_dict(d, name="v4-tiny-hca24")


@pytest.fixture(scope="module")
def models(tiny_ckpt, tmp_path_factory):
    from v4ray.model.tiny import make_tiny

    out = {p: load_model(tiny_ckpt(p), torch.float32) for p in PARITY_PRESETS}
    out["rates-4-24"] = load_model(make_tiny(tmp_path_factory.mktemp("r424"), cfg=_rates_4_24(), dtype="fp32"),
                                   torch.float32)
    return out


def _greedy_agree(ref: torch.Tensor, got: torch.Tensor, where: str) -> None:
    """Same argmax per row, or a reported near-tie."""
    for r in (ref.argmax(-1) != got.argmax(-1)).nonzero().flatten().tolist():
        top2 = ref[r].topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < NEAR_TIE, f"{where}, row {r}: argmax differs with a top-2 gap of {gap:.2e}"
        warnings.warn(f"{where}, row {r}: near-tie (gap {gap:.1e}), argmax flipped")


def _prefilled(model, lens, seed=0, blocks=16, slots=40):
    cache = PagedKVCache(model.cfg, blocks + sum(-(-(n + DECODE_STEPS) // 256) for n in lens), slots)
    seqs = [cache.allocate(n + DECODE_STEPS) for n in lens]
    for i, (s, n) in enumerate(zip(seqs, lens)):
        model.step(parity_prompt(n, seed=seed + i), StepBatch.build(cache, [s], [n]))
    return cache, seqs


def _static_step(model, cache, seqs, tokens, batch_size, width):
    logits = model.decode(DecodeInputs(cache, batch_size, width).fill(seqs, tokens))
    for s in seqs:
        s.num_tokens += 1
    return logits[:len(seqs)]


@pytest.mark.parametrize("preset", [*PARITY_PRESETS, "rates-4-24"])
def test_static_decode_matches_the_eager_step(models, preset):
    model = models[preset]
    eager_cache, eager_seqs = _prefilled(model, PROMPT_LENS)
    static_cache, static_seqs = _prefilled(model, PROMPT_LENS)
    tokens = [20, 30, 40, 50]
    for step in range(DECODE_STEPS):
        ref = model.step(torch.tensor(tokens), StepBatch.build(eager_cache, eager_seqs, [1] * len(tokens)))
        got = _static_step(model, static_cache, static_seqs, tokens, 8, 4)
        assert (ref - got).abs().max() <= LOGIT_TOL, f"{preset} step {step}"
        _greedy_agree(ref, got, f"{preset} step {step}")
        tokens = ref.argmax(-1).tolist()  # both paths continue from the reference's tokens


@pytest.mark.parametrize("dtype,kv_format", [(torch.float32, "fp8"), (torch.bfloat16, "bf16"),
                                              (torch.bfloat16, "fp8")])
def test_static_decode_matches_the_eager_step_in_bf16_and_with_an_fp8_cache(tiny_ckpt, dtype, kv_format):
    """The fixed-shape step reads every key as stored (a fresh entry substituted in storage form), so it sees what
    the eager step's write-then-read sees: bf16 logits are equal bit for bit, fp8 within LOGIT_TOL.

    The bucket holds exactly the batch's rows. ATen's vectorized elementwise kernels round a tensor's tail on
    another path than its body (`torch.sigmoid` of 48 values differs in the last bit from the first 48 of 64), so
    a padded bucket's mHC weights can differ from the unpadded eager batch's by an fp32 ulp, which a bf16 stream
    then sometimes rounds the other way (measured: bucket 8 for these 4 rows, a 6e-8 difference in one mHC post
    weight, 1.2e-3 in the logits 37 steps in). Padded buckets are compared in fp32 (LOGIT_TOL) by
    `test_a_sequence_decodes_the_same_alone_padded_and_in_a_full_bucket` and the tests above."""
    ckpt = tiny_ckpt("v4-tiny", dtype="bf16" if dtype == torch.bfloat16 else "fp32", confident=True)
    model = load_model(ckpt, dtype)
    caches = [PagedKVCache(model.cfg, 16, 6, dtype=dtype, kv_format=kv_format) for _ in range(2)]
    seqs = [[c.allocate(n + DECODE_STEPS) for n in PROMPT_LENS] for c in caches]
    for cache, ss in zip(caches, seqs):
        for i, (s, n) in enumerate(zip(ss, PROMPT_LENS)):
            model.step(parity_prompt(n, seed=i), StepBatch.build(cache, [s], [n]))
    tokens = [20, 30, 40, 50]
    for step in range(DECODE_STEPS):
        ref = model.step(torch.tensor(tokens), StepBatch.build(caches[0], seqs[0], [1] * len(tokens)))
        got = _static_step(model, caches[1], seqs[1], tokens, len(tokens), 4)
        if kv_format == "bf16":
            assert torch.equal(ref, got), f"{dtype} {kv_format} step {step}"
        assert (ref - got).abs().max() <= LOGIT_TOL, f"{dtype} {kv_format} step {step}"
        _greedy_agree(ref, got, f"{dtype} {kv_format} step {step}")
        tokens = ref.argmax(-1).tolist()


def test_a_sequence_decodes_the_same_alone_padded_and_in_a_full_bucket(models):
    """One sequence: alone (a bucket of 1), padded into a bucket of 32, and beside 31 others."""
    model = models["v4-tiny"]
    lens = [140] + [60 + 9 * i for i in range(31)]
    runs = {}
    for name, n_seqs, bucket in (("alone", 1, 1), ("padded", 1, 32), ("full", 32, 32)):
        cache, seqs = _prefilled(model, lens[:n_seqs])
        tokens, out = [21 + i for i in range(n_seqs)], []
        for _ in range(24):
            logits = _static_step(model, cache, seqs, tokens, bucket, 2)
            out.append(logits[0])
            tokens = logits.argmax(-1).tolist()
        runs[name] = torch.stack(out)
    for name in ("padded", "full"):
        assert (runs[name] - runs["alone"]).abs().max() <= LOGIT_TOL, name
        _greedy_agree(runs["alone"], runs[name], f"bucket {name}")


def _compile_step(model, cache, backend, pool_on_close=False):
    def step(token_ids, positions, slots, block_tables, real):
        batch = DecodeBatch(cache, token_ids, positions, slots, block_tables, real, deferred=[],
                            pool_on_close=pool_on_close)
        return model.decode(batch), batch.deferred

    return torch.compile(step, fullgraph=True, dynamic=False, backend=backend)


# a step before any HCA window closes, then one where some row's closes, for each HCA rate below (128 and 16: 127;
# 24: 143), beside a short prompt and one past the sliding window
CLOSING_LENS = [126, 7, 142, 300]


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-pro", "rates-4-24"])
def test_the_decode_step_compiles_as_one_graph_per_bucket(models, preset):
    """fullgraph=True, dynamic=False: a graph break, a host read or a data-dependent shape fails the compile.
    aot_eager traces and functionalises like inductor (without generating code), and runs the result: the
    compiled step's logits equal the uncompiled step's bit for bit, in two buckets of three configs (every layer
    kind; HCA rates 128, 16 and 24). In the second bucket the step pools HCA windows only when one closes
    (`pool_on_close`, as the CPU's compiled step does; the first bucket's step pools every step, as a CUDA graph
    does): its graph holds that cond, and its steps with and without a closing window match the uncompiled step's,
    which pools every step. 15 s each on 2 cores."""
    from torch._dynamo.backends.registry import lookup_backend

    model = models[preset]
    conds = []

    def backend(gm, example_inputs):
        conds.append(sum(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes))
        return lookup_backend("aot_eager")(gm, example_inputs)

    with torch._dynamo.config.patch(disable=False, recompile_limit=8):
        torch._dynamo.reset()
        for bucket, width, pool_on_close in ((4, 2, False), (16, 4, True)):
            eager_cache, eager_seqs = _prefilled(model, CLOSING_LENS)
            cache, seqs = _prefilled(model, CLOSING_LENS)
            compiled = _compile_step(model, cache, backend, pool_on_close)
            tokens = [20, 30, 40, 50]
            for _ in range(3):
                ref = _static_step(model, eager_cache, eager_seqs, tokens, bucket, width)
                inputs = DecodeInputs(cache, bucket, width)
                b = inputs.fill(seqs, tokens)
                logits, writes = compiled(b.token_ids, b.positions, b.slots, b.block_tables, b.real)
                b.apply_writes(writes)
                for s in seqs:
                    s.num_tokens += 1
                assert torch.equal(logits[:4], ref), (preset, bucket)
                tokens = ref.argmax(-1).tolist()
    hca_layers = sum(t == HCA for t in model.cfg.layer_types)
    assert hca_layers and conds == [0, hca_layers], conds


def test_a_host_read_in_the_decode_step_fails_the_compile(models, monkeypatch):
    """The check can fail: a `.item()` planted in attention (the kind of sync the step had per layer) breaks it."""
    from v4ray.model import v4

    model = models["v4-tiny"]
    real = v4.Attention._attend_static

    def with_host_read(self, u, c_q, q, kv, positions, d, lc):
        if int(positions.max().item()) < 0:
            raise AssertionError
        return real(self, u, c_q, q, kv, positions, d, lc)

    monkeypatch.setattr(v4.Attention, "_attend_static", with_host_read)
    cache, seqs = _prefilled(model, [40, 50])
    with torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()
        compiled = _compile_step(model, cache, "aot_eager")
        b = DecodeInputs(cache, 2, 1).fill(seqs, [5, 6])
        with pytest.raises(Exception, match="(?i)item|data.dependent|graph break|Unsupported"):
            compiled(b.token_ids, b.positions, b.slots, b.block_tables, b.real)


def _engine(ckpt, decode_step: str) -> EngineCore:
    runner = ModelRunner(load_model(ckpt, torch.float32), 64 << 20, 16, decode_step=decode_step, max_model_len=1024)
    return EngineCore(runner, V4Tokenizer.from_dir(ckpt), 1024, max_num_batched_tokens=4096, max_num_seqs=16)


def _drain(core: EngineCore, work) -> dict:
    for rid, prompt, params in work:
        core.add_request(rid, prompt, params)
    done = {}
    while core.has_work():
        for o in core.step():
            assert o.error is None, o.error
            if o.finished:
                done[o.request_id] = o.outputs[0]
    return done


# v4-tiny's StepBatch regions: attention in and out and the MoE sublayer of hash and top-k layers at 1 row and at
# any count (4 x 2), the prefill attention alone and with the CSA indexer (2), the Sinkhorn op's graph (1, any: 2),
# the compressors' emit per kind (CSA, its indexer's, HCA: 3), a banded group's attention alone (every layer kind)
# and with the CSA indexer (2), a stack of groups' attention alone and with the CSA indexer (2)
REGION_GRAPHS = 4 * 2 + 2 + 2 + 3 + 2 + 2
GRAPHS = 2 + REGION_GRAPHS   # and the decode step's B = 1 and B >= 2


class _Registered:
    """A pytree node type registered while an engine serves."""


@pytest.mark.timeout(900)  # two cold inductor compiles (B = 1 and B >= 2): about two minutes on 2 cores
def test_the_compiled_engine_generates_what_the_eager_engine_does(tiny_ckpt):
    """inductor, as `v4ray serve` runs it on the CPU: greedy requests of mixed lengths (buckets shrink as they
    finish) give the eager engine's tokens, all from two compiled graphs, B = 1 and B >= 2 (every batch size and
    table width is a bucket on the CPU; no size recompiles); seeded sampled requests reproduce across two runs."""
    ckpt = tiny_ckpt("v4-tiny")
    greedy = [(f"g{i}", parity_prompt(100 + 23 * i, seed=i).tolist(),
               SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True, logprobs=2)) for i in range(6)]
    seeded = [(f"s{i}", parity_prompt(90 + 11 * i, seed=50 + i).tolist(),
               SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True))
              for i in range(4)]
    eager = _drain(_engine(ckpt, "eager"), greedy)
    with torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()
        counters.clear()
        core = _engine(ckpt, "compiled")
        assert core.runner.graphs is not None and core.runner.graphs.compiled
        assert core.runner.model.regions.compiled
        # the decode step's B = 1 and B >= 2, the StepBatch regions (attention in and out, the MoE sublayer of hash
        # and top-k layers, at 1 row and at any count; the prefill attention, alone and with the CSA indexer, dense
        # and banded; the compressors' emit per kind) and the Sinkhorn op's own graph (1 row, any count): all
        # compiled at start-up
        assert counters["stats"]["unique_graphs"] == GRAPHS, dict(counters["stats"])
        # every graph can come from inductor's on-disk cache at the next start-up (the HCA pool's torch.cond among
        # them, kernels/compiled.py CACHEABLE_OPS): none is compiled past the cache
        assert not counters["inductor"]["fxgraph_cache_bypass"], dict(counters["inductor"])
        assert not counters["aot_autograd"]["autograd_cache_bypass"], dict(counters["aot_autograd"])
        compiled = _drain(core, greedy)
        # a module imported mid-serving that registers a pytree type (transformers does) recompiles nothing
        # (kernels/compiled.py keep_guard)
        torch.utils._pytree.register_pytree_node(_Registered, lambda x: ((), None), lambda _, __: _Registered())
        try:
            first, second = _drain(core, seeded), _drain(core, [(f"again-{r}", p, s) for r, p, s in seeded])
        finally:
            torch.utils._pytree._deregister_pytree_node(_Registered)
        assert len({b for b, _ in core.runner.graphs.inputs}) >= 5, list(core.runner.graphs.inputs)
        assert {b for b, _ in core.runner.graphs.inputs} >= {1, 2}
        assert counters["stats"]["unique_graphs"] == GRAPHS, dict(counters["stats"])  # nothing compiled later
    for rid, _, _ in greedy:
        ref, got = eager[rid], compiled[rid]
        for t, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
            if a != b:  # a flip is allowed only where the reference's top-2 were a near-tie
                lp = sorted(ref.logprobs[t].values(), key=lambda x: -x.logprob)
                assert lp[0].logprob - lp[1].logprob < NEAR_TIE, (rid, t)
                warnings.warn(f"{rid} token {t}: near-tie, compiled decode took the other token")
                break
        else:
            assert len(ref.token_ids) == len(got.token_ids)
    for rid, _, _ in seeded:
        assert first[rid].token_ids == second[f"again-{rid}"].token_ids, rid


@pytest.mark.timeout(600)  # a cold compile of the regions: about a minute on 2 cores
def test_compiled_step_regions_prefill_as_the_plain_ones(models):
    """The StepBatch step with its regions compiled (mHC, projections, MoE sublayer, prefill attention as inductor
    graphs, row counts symbolic): the logits of prompt batches of every shape (one prompt, several sharing an
    attention group, chunks continuing cached sequences, a decode row beside them) equal the plain regions' within
    LOGIT_TOL (inductor fuses and reorders fp32 sums: ulp-level drift), with no compile after the warm-up."""
    from v4ray.model.v4 import EAGER_REGIONS, StepRegions

    model = models["v4-tiny"]
    lens = [3, 40, 130, 7, 820, 200, 200, 200]
    # (sequence, first token, tokens) chunks per step; sequence 4's chunks are banded (`StepBatch.banded`: 400 and
    # 420 >= 3 x v4-tiny's window of 128), the first at the sequence's start, the second after a full ring;
    # sequences 5-7 go as stacks (`StepBatch.prefill_stacks`), behind a decode row (views from row 1) and alone
    plans = [[(0, 0, 3)], [(1, 0, 40), (2, 0, 100), (3, 0, 7)], [(2, 100, 30), (4, 0, 400), (1, 40, 1)],
             [(4, 400, 420), (0, 3, 1), (3, 7, 1)], [(2, 130, 1), (5, 0, 130), (6, 0, 130), (7, 0, 130)],
             [(5, 130, 70), (6, 130, 70), (7, 130, 70)]]
    assert 400 >= StepBatch.BANDED_MIN_WINDOWS * model.cfg.sliding_window  # the premise of sequence 4's chunks
    prompts = [parity_prompt(n + 1, seed=40 + i).tolist() for i, n in enumerate(lens)]
    out = {}
    for name in ("plain", "compiled"):
        with torch._dynamo.config.patch(disable=False):
            regions = EAGER_REGIONS if name == "plain" else StepRegions(compile_=True)
            if regions.compiled:
                torch._dynamo.reset()
                counters.clear()
                regions.warm_up(model)
                assert counters["stats"]["unique_graphs"] == REGION_GRAPHS, dict(counters["stats"])  # not skipped
                counters.clear()
            model.use_regions(regions)
            try:
                cache = PagedKVCache(model.cfg, 32, 8)
                seqs = [cache.allocate(n + 1) for n in lens]
                out[name] = [model.step([t for i, a, n in plan for t in prompts[i][a:a + n]],
                                        StepBatch.build(cache, [seqs[i] for i, _, _ in plan], [n for *_, n in plan]))
                             for plan in plans]
            finally:
                model.use_regions(EAGER_REGIONS)
            if regions.compiled:
                assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    for i, (ref, got) in enumerate(zip(out["plain"], out["compiled"])):
        assert ref.shape == got.shape and (ref - got).abs().max() <= LOGIT_TOL, f"step {i}: {(ref - got).abs().max()}"
        _greedy_agree(ref, got, f"step {i}")


def test_a_step_with_prompt_chunks_runs_its_decodes_fixed_shape_beside_an_eager_prefill(models):
    """Decode rows of a mixed step take the fixed-shape step, its prompt chunks the eager one; the logits come
    back in chunk order and equal an all-eager runner's."""
    model = models["v4-tiny"]
    runners = {mode: ModelRunner(model, 64 << 20, 8, decode_step=mode, max_model_len=1024)
               for mode in ("eager", "static")}
    prompts = {k: parity_prompt(n, seed=i).tolist() for i, (k, n) in enumerate({"a": 150, "b": 70, "c": 200,
                                                                                  "d": 90}.items())}
    plan = [[("a", prompts["a"], [149]), ("b", prompts["b"], [69])],
            [("a", [5], [0]), ("c", prompts["c"][:120], []), ("b", [6], [0])],        # decode, chunk, decode
            [("c", prompts["c"][120:], [79]), ("a", [7], [0]), ("b", [8], [0]), ("d", prompts["d"], [0, 89])],
            [("a", [9], [0]), ("b", [10], [0]), ("c", [11], [0]), ("d", [12], [0])]]
    out = {}
    for mode, runner in runners.items():
        for key, tokens in prompts.items():
            runner.admit(key, len(tokens) + 4)
        out[mode] = [runner.step(chunks) for chunks in plan]
    assert runners["static"].graphs is not None
    for i, (ref, got) in enumerate(zip(out["eager"], out["static"])):
        assert ref.shape == got.shape and (ref - got).abs().max() <= LOGIT_TOL, f"step {i}"
        _greedy_agree(ref, got, f"step {i}")
