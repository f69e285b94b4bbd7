"""Hardening of the engine itself (no Ray): sampling parameters bounded at the edge, one request's failure
isolated from the others, DELTA outputs that add up to the cumulative ones, and bounded streams."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from v4ray.engine.core import EngineCore
from v4ray.model.loader import load_model
from v4ray.engine.outputs import RequestOutput, merge_delta
from v4ray.engine.runner import ModelRunner
from v4ray.engine.sampling import RequestOutputKind, SamplingParamError, SamplingParams
from v4ray.model.tokenizer import V4Tokenizer

from conftest import parity_prompt

BATCH_LOGPROB_TOL = 1e-4  # fp32 logits of one row move by ~1e-6 with the batch around it (matmul shapes)


def _core(ckpt, max_num_seqs=16):
    runner = ModelRunner(load_model(ckpt, torch.float32), 32 << 20, max_num_seqs)
    return EngineCore(runner, V4Tokenizer.from_dir(ckpt), 2048, 512, max_num_seqs)


def _run(core, requests):
    """Step until done; returns every output per request id, in order."""
    for rid, ids, params in requests:
        core.add_request(rid, ids, params)
    seen: dict[str, list[RequestOutput]] = {}
    while core.has_work():
        for out in core.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


# ---- finding 1 and 5: values that once reached torch.multinomial or the seed, now refused with the field --------
@pytest.mark.parametrize("field, value", [
    ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", 1e300), ("temperature", -0.1),
    ("repetition_penalty", 1e-39), ("repetition_penalty", 0.0), ("repetition_penalty", 1e9),
    ("top_p", 0.0), ("top_p", float("nan")), ("min_p", 1.5), ("seed", 2**64), ("seed", -1),
    ("presence_penalty", float("-inf")), ("frequency_penalty", 2.5), ("top_k", 2**40), ("n", 0),
    ("max_tokens", "10"), ("max_tokens", [5]), ("logprobs", 21), ("stop", ["x"] * 17), ("stop", 5),
    ("logit_bias", {"1": float("inf")}), ("logit_bias", {"-1": 1.0}), ("temperature", 10**400),
    ("output_kind", "everything"),
])
def test_sampling_params_refuse_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_sampling_params_accept_the_documented_bounds():
    p = SamplingParams(temperature=100, repetition_penalty=0.01, seed=2**64 - 1, top_p=1e-9, min_p=1.0,
                       presence_penalty=-2, frequency_penalty=2, top_k=-1)
    assert p.temperature == 100.0 and p.seed == 2**64 - 1
    SamplingParams(repetition_penalty=100.0, temperature=0)


def test_extreme_valid_params_sample_without_error(tiny_ckpt):
    """Each bound, at its edge, beside other requests: every request finishes normally."""
    ckpt = tiny_ckpt("v4-tiny-swa")
    core = _core(ckpt)
    ids = parity_prompt(20).tolist()
    edges = [dict(temperature=100.0, min_tokens=4), dict(temperature=1.0, repetition_penalty=0.01),
             dict(temperature=1e-5 * 1.0001, repetition_penalty=100.0), dict(temperature=0.5, top_p=1e-9, min_p=1.0),
             dict(temperature=1.0, top_k=1, presence_penalty=-2, frequency_penalty=2),
             dict(temperature=1.0, logit_bias={0: 100.0, 5: -100.0}, seed=2**64 - 1)]
    seen = _run(core, [(f"r{i}", ids, SamplingParams(max_tokens=6, ignore_eos=True, **kw))
                       for i, kw in enumerate(edges)])
    for i in range(len(edges)):
        final = seen[f"r{i}"][-1]
        assert final.error is None and final.finished and len(final.outputs[0].token_ids) == 6


def test_a_request_that_fails_in_sampling_fails_alone(tiny_ckpt):
    """A request whose sampling raises inside the step (its parameters corrupted after validation, as a bug
    would) ends with an error; the requests beside it produce exactly the tokens they produce alone."""
    ckpt = tiny_ckpt("v4-tiny-swa")
    ids = parity_prompt(24).tolist()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = _run(_core(ckpt), [("a", ids, greedy)])["a"][-1].outputs[0].token_ids

    core = _core(ckpt)
    bad = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    bad.temperature = float("nan")  # what validation refuses; multinomial raises on NaN probabilities
    core.add_request("bad", ids, bad)
    seen = _run(core, [("a", ids, greedy), ("b", ids[:-3], greedy)])
    assert seen["bad"][-1].error and seen["bad"][-1].finished
    assert seen["a"][-1].error is None and seen["a"][-1].outputs[0].token_ids == alone
    assert len(seen["b"][-1].outputs[0].token_ids) == 8
    assert not core.requests and core.runner.cache.blocks.num_free == core.runner.cache.blocks.num


def test_a_request_that_fails_in_batched_sampling_leaves_seeded_neighbours_exact(tiny_ckpt):
    """All rows of a step are sampled together and read back at once; a row whose probabilities are invalid (NaN
    temperature) fails its request (all n of its sequences) when the batch is read back, and the seeded, penalised
    and logprob-asking requests beside it get exactly the tokens they get alone (logprobs within the batch's
    rounding)."""
    ckpt = tiny_ckpt("v4-tiny-swa")
    ids = parity_prompt(24).tolist()
    neighbours = {"s": SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=30, seed=11, logprobs=3),
                  "p": SamplingParams(max_tokens=8, temperature=0.7, seed=2, repetition_penalty=1.3,
                                      frequency_penalty=0.4, logit_bias={7: 2.0}, min_tokens=4),
                  "g": SamplingParams(max_tokens=8, temperature=0, presence_penalty=1.0, logprobs=0)}
    alone = {rid: _run(_core(ckpt), [(rid, ids[:20 + i], p)])[rid][-1].outputs
             for i, (rid, p) in enumerate(neighbours.items())}
    core = _core(ckpt)
    bad = SamplingParams(max_tokens=8, temperature=1.0, n=2, ignore_eos=True)
    bad.temperature = float("nan")
    core.add_request("bad", ids, bad)
    seen = _run(core, [(rid, ids[:20 + i], p) for i, (rid, p) in enumerate(neighbours.items())])
    assert seen["bad"][-1].error and "probability tensor" in seen["bad"][-1].error and len(seen["bad"]) == 1
    for rid in neighbours:
        got = seen[rid][-1].outputs
        assert seen[rid][-1].error is None
        assert [c.token_ids for c in got] == [c.token_ids for c in alone[rid]], rid
        for a, b in zip(got, alone[rid]):
            assert math.isclose(a.cumulative_logprob, b.cumulative_logprob, abs_tol=BATCH_LOGPROB_TOL)
            for x, y in zip(a.logprobs or [], b.logprobs or []):
                assert x.keys() == y.keys()
                assert all(math.isclose(x[t].logprob, y[t].logprob, abs_tol=BATCH_LOGPROB_TOL) for t in x)
    assert not core.requests and core.runner.cache.blocks.num_free == core.runner.cache.blocks.num


def test_add_request_refuses_token_ids_outside_the_vocabulary(tiny_ckpt):
    core = _core(tiny_ckpt("v4-tiny-swa"))
    vocab = core.tokenizer.vocab_size
    with pytest.raises(SamplingParamError) as e:
        core.add_request("x", [0, vocab], SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(SamplingParamError) as e:
        core.add_request("y", [0, 5], SamplingParams(logit_bias={vocab + 3: 1.0}))
    assert e.value.param == "logit_bias"
    assert not core.has_work()


# ---- finding 4: outputs carry only what is new --------------------------------------------------------------
def test_delta_outputs_add_up_to_the_cumulative_output(tiny_ckpt):
    """Same seeded request as CUMULATIVE and as DELTA (with stop strings held back, logprobs, n=3): merging the
    deltas gives the cumulative output; the deltas carry each token once (linear traffic)."""
    ckpt = tiny_ckpt("v4-tiny-swa", confident=True)
    ids = parity_prompt(16).tolist()
    kw = dict(n=3, max_tokens=40, temperature=0.9, seed=7, logprobs=3, prompt_logprobs=1, stop=["ab", "q"])
    full = _run(_core(ckpt), [("r", ids, SamplingParams(**kw))])["r"]
    deltas = _run(_core(ckpt), [("r", ids, SamplingParams(output_kind=RequestOutputKind.DELTA, **kw))])["r"]
    final = full[-1]
    merged = RequestOutput("r", None, [], None, [], finished=False)
    for d in deltas:
        merge_delta(merged, d)
    assert merged.finished and merged.prompt_token_ids == ids
    assert merged.prompt_logprobs is not None and len(merged.prompt_logprobs) == len(ids)
    for a, b in zip(merged.outputs, final.outputs):
        assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == (b.text, b.token_ids, b.finish_reason,
                                                                          b.stop_reason)
        assert [set(x) for x in a.logprobs] == [set(x) for x in b.logprobs]
        assert math.isclose(a.cumulative_logprob, b.cumulative_logprob, rel_tol=1e-9)
    sent = sum(len(c.token_ids) for d in deltas for c in d.outputs)
    assert sent == sum(len(c.token_ids) for c in final.outputs)
    assert sum(len(d.prompt_token_ids) for d in deltas) == len(ids)  # the prompt travels once


def test_final_only_outputs_once(tiny_ckpt):
    ckpt = tiny_ckpt("v4-tiny-swa")
    seen = _run(_core(ckpt), [("r", parity_prompt(10).tolist(),
                               SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                              output_kind=RequestOutputKind.FINAL_ONLY))])["r"]
    assert len(seen) == 1 and seen[0].finished and len(seen[0].outputs[0].token_ids) == 5


def test_a_slow_reader_holds_one_merged_output(tiny_ckpt):
    """The engine runs ahead of a reader that does not read: its stream holds one pending output (the deltas
    merged), and what the reader finally gets equals the whole output."""
    from v4ray.serve.async_engine import AsyncEngine

    ckpt = tiny_ckpt("v4-tiny-swa")
    core = _core(ckpt)
    engine = AsyncEngine(core)
    ids = parity_prompt(12).tolist()

    async def main():
        gen = engine.generate(ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2,
                                                  output_kind=RequestOutputKind.DELTA))
        first = await gen.__anext__()
        for _ in range(400):  # let the engine finish while we do not read
            if not core.has_work():
                break
            await asyncio.sleep(0.02)
        assert not core.has_work()
        stream = next(iter(engine._streams.values()))
        assert isinstance(stream.pending, RequestOutput)  # one object, not a queue of 29
        rest = [out async for out in gen]
        assert len(rest) == 1 and rest[0].finished
        return merge_delta(first, rest[0])

    try:
        out = asyncio.run(main())
    finally:
        engine.shutdown()
    want = _run(_core(ckpt), [("r", ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))])["r"][-1]
    assert out.outputs[0].token_ids == want.outputs[0].token_ids and len(out.outputs[0].logprobs) == 30
