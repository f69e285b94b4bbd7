"""Incremental prefill/decode through the paged cache against the full forward (this project's reference)."""

from __future__ import annotations

import pytest
import torch

from v4ray.model.kv_cache import PagedKVCache, StepBatch
from v4ray.model.loader import load_model

from conftest import PARITY_PRESETS, parity_prompt, rel_err
from test_parity import PARITY_RTOL, TIE_GAP


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return {p: load_model(tiny_ckpt(p), torch.float32) for p in PARITY_PRESETS}


def _prefill(model, cache, ids, chunks=None):
    """Prefill `ids` into a new sequence in chunks; returns (seq, logits of every prompt position)."""
    seq = cache.allocate(0)
    out, pos = [], 0
    for n in chunks or [len(ids)]:
        cache.append(seq, n)
        out.append(model.step(ids[pos:pos + n], StepBatch.build(cache, [seq], [n]), torch.arange(n)))
        pos += n
    assert pos == len(ids)
    return seq, torch.cat(out)


def _decode_against_full(model, cache, seq, ids, last_logits, steps):
    """Greedy-decode `steps` tokens incrementally; at every step the logits must equal the full forward's."""
    tokens = ids.tolist()
    logits = last_logits
    for step in range(steps):
        top2 = logits.topk(2)
        token = int(top2.indices[0])
        tokens.append(token)
        cache.append(seq, 1)
        logits = model.step(torch.tensor([token]), StepBatch.build(cache, [seq], [1]))[0]
        full = model(torch.tensor(tokens))[-1]
        assert rel_err(logits[None], full[None]).max() <= PARITY_RTOL, f"step {step}"
        # the incremental choice equals the full forward's, except at a genuine tie
        full_top2 = full.topk(2)
        if int(full_top2.indices[0]) != int(logits.argmax()):
            assert float(full_top2.values[0] - full_top2.values[1]) < TIE_GAP
    return tokens


@pytest.mark.parametrize("preset", PARITY_PRESETS)
def test_incremental_decode_equals_full_recomputation(models, preset):
    model = models[preset]
    cache = PagedKVCache(model.cfg, num_blocks=6, num_slots=1, block_size=128)  # crosses block boundaries
    ids = parity_prompt(200)
    seq, prompt_logits = _prefill(model, cache, ids)
    assert rel_err(prompt_logits, model(ids)).max() <= PARITY_RTOL
    _decode_against_full(model, cache, seq, ids, prompt_logits[-1], steps=64)
    assert len(seq.block_table) == 3 and seq.num_tokens == 264
    cache.free(seq)
    assert cache.blocks.num_free == 6 and cache.slots.num_free == 1


@pytest.mark.parametrize("preset", PARITY_PRESETS)
def test_chunked_prefill_equals_one_shot(models, preset):
    model = models[preset]
    ids = parity_prompt(1 + 3 + 17 + 133 + 46)
    one = _prefill(model, PagedKVCache(model.cfg, 2, 1), ids)[1]
    cache = PagedKVCache(model.cfg, 2, 1)
    seq, chunked = _prefill(model, cache, ids, chunks=[1, 3, 17, 128 + 5, 46])
    assert rel_err(chunked, one).max() <= PARITY_RTOL
    _decode_against_full(model, cache, seq, ids, chunked[-1], steps=4)


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-pro"])
def test_the_last_layer_runs_past_its_cache_writes_for_the_logit_rows_only(models, preset, monkeypatch):
    """`V4Model.step`: every row of the last layer writes the cache, only the logit rows go on. Where each is its
    chunk's last token, only they attend (`Attention.attend_tail`: after the writes, as decode rows), and only they go
    through the attention output and MoE: the last MoE gate sees exactly those rows (the others every row), the
    logits equal the full forward's. A logit row inside a chunk (a prompt logprob) makes the layer attend for every
    row, its logits equal the full forward's too. A chunk whose logits nobody wants (an earlier chunk of a prompt)
    attends nowhere in the last layer and leaves a cache that decodes as the full recomputation does."""
    model = models[preset]
    seen, attended = [], []
    for i, block in enumerate(model.layers):
        gate = block.ffn.gate
        monkeypatch.setattr(gate, "forward", lambda x, ids, i=i, real=gate.forward: seen.append((i, x.shape[0])) or
                            real(x, ids))
    last = len(model.layers) - 1
    attn = model.layers[last].attn
    monkeypatch.setattr(attn, "attend", lambda u, *a, real=attn.attend: attended.append(("all", u.shape[0])) or
                        real(u, *a))
    monkeypatch.setattr(attn, "attend_tail", lambda *a, real=attn.attend_tail: attended.append(
        ("tail", a[-1].rows.numel())) or real(*a))
    prompts = [parity_prompt(150 + 7 * i, seed=30 + i) for i in range(3)]
    cache = PagedKVCache(model.cfg, 12, 3)
    seqs = [cache.allocate(len(p)) for p in prompts]
    logits = model.step(torch.cat(prompts), StepBatch.build(cache, seqs, [len(p) for p in prompts]))
    assert seen == [(i, sum(map(len, prompts))) for i in range(last)] + [(last, 3)]
    assert attended == [("tail", 3)]
    for got, ids in zip(logits, prompts):
        assert rel_err(got[None], model(ids)[-1:]).max() <= PARITY_RTOL
    attended.clear()
    cache = PagedKVCache(model.cfg, 12, 3)
    seqs = [cache.allocate(len(p)) for p in prompts]
    inside = [len(prompts[0]) - 1, len(prompts[0]) + 40]        # the first chunk's last row, a row of the second
    logits = model.step(torch.cat(prompts), StepBatch.build(cache, seqs, [len(p) for p in prompts]), inside)
    assert attended == [("all", sum(map(len, prompts)))]
    assert rel_err(logits[:1], model(prompts[0])[-1:]).max() <= PARITY_RTOL
    assert rel_err(logits[1:], model(prompts[1])[40:41]).max() <= PARITY_RTOL
    seen.clear()
    attended.clear()
    ids = prompts[0]
    cache = PagedKVCache(model.cfg, 4, 1)
    seq = cache.allocate(100)
    none = model.step(ids[:100], StepBatch.build(cache, [seq], [100]), torch.arange(0))
    assert none.shape == (0, model.cfg.vocab_size) and seen == [(i, 100) for i in range(last)] and not attended
    cache.append(seq, len(ids) - 100)
    rest = model.step(ids[100:], StepBatch.build(cache, [seq], [len(ids) - 100]))
    assert attended == [("tail", 1)]
    assert rel_err(rest, model(ids)[-1:]).max() <= PARITY_RTOL
    _decode_against_full(model, cache, seq, ids, rest[0], steps=8)


def _boundary_lengths(cfg) -> list[int]:
    marks = {cfg.sliding_window} | {r for r in cfg.compress_ratios if r}
    return sorted({n + k for n in marks for k in (-1, 0, 1)} | {2 * cfg.sliding_window + 1})


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-pro", "v4-tiny-rates"])
def test_prompts_ending_at_window_boundaries(models, preset):
    """Prompts ending 1 before, at and 1 after the CSA/HCA windows and the sliding window, then decode."""
    model = models[preset]
    for n in _boundary_lengths(model.cfg):
        cache = PagedKVCache(model.cfg, 2, 1)
        ids = parity_prompt(n, seed=n)
        seq, logits = _prefill(model, cache, ids)
        assert rel_err(logits, model(ids)).max() <= PARITY_RTOL, f"prompt of {n}"
        _decode_against_full(model, cache, seq, ids, logits[-1], steps=3)


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-pro"])
def test_batch_of_8_equals_each_alone(models, preset):
    model = models[preset]
    lengths = [1, 5, 17, 64, 127, 128, 129, 250]
    prompts = [parity_prompt(n, seed=i) for i, n in enumerate(lengths)]
    steps = 12

    def run(group: list[int]) -> dict[int, torch.Tensor]:
        cache = PagedKVCache(model.cfg, num_blocks=2 * len(group), num_slots=len(group))
        seqs = [cache.allocate(lengths[i]) for i in group]
        logits = model.step(torch.cat([prompts[i] for i in group]),
                            StepBatch.build(cache, seqs, [lengths[i] for i in group]))
        hist = {i: [logits[k]] for k, i in enumerate(group)}
        for _ in range(steps):
            toks = [int(hist[i][-1].argmax()) for i in group]
            for s in seqs:
                cache.append(s, 1)
            logits = model.step(torch.tensor(toks), StepBatch.build(cache, seqs, [1] * len(group)))
            for k, i in enumerate(group):
                hist[i].append(logits[k])
        for s in seqs:
            cache.free(s)
        assert cache.blocks.num_free == cache.blocks.num
        return {i: torch.stack(h) for i, h in hist.items()}

    together = run(list(range(8)))
    for i in range(8):
        alone = run([i])[i]
        # same tokens were fed (argmax of equal logits); ties would show up as a logit mismatch below
        assert rel_err(together[i], alone).max() <= PARITY_RTOL, f"sequence {i} (length {lengths[i]})"


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-rates"])  # windows long enough for single-chunk groups
def test_equal_prompt_chunks_stack_into_one_call_and_equal_each_alone(models, preset):
    """Prompt chunks of one length at one start attend as one batched call per layer (`StepBatch.prefill_stacks`,
    torch backend), fresh and continuing their sequences (ring rows; CSA entries past the indexer's top-k), behind a
    decode row (the stack's rows start at 1): each chunk's logits equal its own step's, alone in the batch."""
    model = models[preset]
    prompts = [parity_prompt(200, seed=60 + i) for i in range(3)]
    plan = [(0, 130), (130, 70)]

    def run(group: list[int]) -> dict[int, torch.Tensor]:
        cache = PagedKVCache(model.cfg, num_blocks=4 * (len(group) + 1), num_slots=len(group) + 1)
        lead = cache.allocate(5)  # decoding beside the chunks
        model.step(parity_prompt(5, seed=59), StepBatch.build(cache, [lead], [5]))
        seqs = [cache.allocate(200) for _ in group]
        out = {i: [] for i in group}
        for a, n in plan:
            cache.append(lead, 1)
            batch = StepBatch.build(cache, [lead, *seqs], [1] + [n] * len(group))
            if len(group) > 1:  # the premise: one stack of every chunk, after the decode row
                assert batch.prefill_stacks == [tuple((k,) for k in range(1, len(group) + 1))]
            logits = model.step(torch.cat([torch.tensor([7])] + [prompts[i][a:a + n] for i in group]), batch,
                                torch.arange(1, 1 + n * len(group)))
            for k, i in enumerate(group):
                out[i].append(logits[k * n:(k + 1) * n])
        return {i: torch.cat(v) for i, v in out.items()}

    together = run([0, 1, 2])
    for i in range(3):
        assert rel_err(together[i], run([i])[i]).max() <= PARITY_RTOL, f"sequence {i}"


def test_llm_batch_equals_single_requests(tiny_ckpt):
    from v4ray import LLM, SamplingParams

    llm = LLM(model=tiny_ckpt("v4-tiny"), dtype="float32", max_num_batched_tokens=100)  # forces chunked prefill
    prompts = [{"prompt_token_ids": parity_prompt(n, seed=n).tolist()} for n in (3, 130, 257, 40)]
    p = SamplingParams(max_tokens=10, temperature=0, logprobs=1, ignore_eos=True)
    together = llm.generate(prompts, p)
    for prompt, out in zip(prompts, together):
        alone = llm.generate(prompt, p)[0].outputs[0]
        assert out.outputs[0].token_ids == alone.token_ids
        for a, b in zip(out.outputs[0].logprobs, alone.logprobs):
            t = next(iter(b))
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
    # the engine decodes each reported token unless told the caller renders them itself (the HTTP server does)
    tok = llm.tokenizer
    first = together[0].outputs[0].logprobs[0]
    assert all(e.decoded_token == tok.decode_token(t) for t, e in first.items())
    bare = llm.generate(prompts[0], SamplingParams(max_tokens=3, temperature=0, logprobs=1, decode_logprobs=False))
    assert [e.decoded_token for pos in bare[0].outputs[0].logprobs for e in pos.values()] == [None] * 3


def test_cache_refuses_cleanly_when_full(models):
    from v4ray.model.kv_cache import CacheFullError

    cache = PagedKVCache(models["v4-tiny"].cfg, num_blocks=3, num_slots=2)
    a = cache.allocate(2 * 256)
    assert not cache.can_allocate(2 * 256)
    with pytest.raises(CacheFullError):
        cache.allocate(2 * 256)
    assert cache.blocks.num_free == 1 and cache.slots.num_free == 1  # nothing half-allocated
    cache.free(a)
    assert cache.blocks.num_free == 3 and cache.slots.num_free == 2


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-pro", "v4-tiny-rates"])
def test_a_csa_prefills_leading_queries_attend_without_the_indexer(models, preset, monkeypatch):
    """A query that sees no more compressed entries than the indexer keeps attends to all of them, so a CSA prefill
    group's leading such rows skip the indexer (`EntryLayout.plain_rows`): the indexer scores exactly the queries
    that see more, in a prompt alone (v4-tiny: one attention call; the pro and rates presets: a banded chunk) and in
    a stack of equal prompts, and every position's logits equal the full forward's."""
    import v4ray.model.v4 as v4
    from v4ray.model.config import CSA

    model = models[preset]
    cfg = model.cfg
    ratio = cfg.compress_ratios[cfg.layer_types.index(CSA)]
    first_scored = (cfg.index_topk + 1) * ratio - 1   # the first position that sees index_topk + 1 entries
    scored, real = [], v4.indexer_topk
    monkeypatch.setattr(v4, "indexer_topk", lambda q, keys, w, lo, hi, k: scored.append(hi - lo) or
                        real(q, keys, w, lo, hi, k))
    prompts = [parity_prompt(320, seed=9 + i) for i in range(3)]
    full = [model(ids) for ids in prompts]                # the reference path scores every query: not recorded
    scored.clear()
    ids = prompts[0]
    _, alone = _prefill(model, PagedKVCache(model.cfg, 4, 1), ids)
    assert rel_err(alone, full[0]).max() <= PARITY_RTOL
    assert scored and all(len(v) == len(ids) - first_scored and (v > cfg.index_topk).all() for v in scored)
    scored.clear()
    cache = PagedKVCache(model.cfg, 12, 3)
    seqs = [cache.allocate(len(ids)) for _ in range(3)]
    stacked = model.step(torch.cat(prompts), StepBatch.build(cache, seqs, [len(ids)] * 3),
                         torch.arange(3 * len(ids))).view(3, len(ids), -1)
    for got, ref in zip(stacked, full):
        assert rel_err(got, ref).max() <= PARITY_RTOL
    assert scored and all(v.shape[-1] == len(ids) - first_scored and (v > cfg.index_topk).all() for v in scored)
