"""Batched sampling (issue 17 item 4) against the per-row path it replaced, bit for bit, on CPU.

Until issue 17 every sampled row ran its own chain of device ops: `Penalties` (sparse logit_bias ids) then
`sampling_probs` per row, then `draw`. The engine now shapes the whole step's rows at once (`Penalties.apply_rows`
on [S, V], `batch_probs`), with each request's parameters in a device row (`sampling_row`). The per-row path is
kept below as `reference_*` (the code as it was, commit 36db9b5) and the batched one must give the same tokens,
logprobs, ranks and top-k, and bit-identical probabilities, for a batch mixing every kind of row.

Speed: bench/sampler.py (per-row against batched at V=129280; on the CPU they are within 3-17 %, see its docstring).
"""

from __future__ import annotations

import pytest
import torch

from v4ray.engine.sampler import (
    INVALID_PROBABILITIES,
    Penalties,
    SamplingBatch,
    batch_probs,
    draw,
    make_generator,
    read_back,
    sampling_probs,
    sampling_row,
)
from v4ray.engine.sampling import SamplingParams

VOCAB, EOS = 300, 1
PROMPT = [5, 6, 7, 7]


# ---- the per-row path as it was ----------------------------------------------------------------------------------


def reference_shape(logits: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The old `Penalties.apply` of one row [V]: sparse logit_bias ids, penalties from the token lists, min_tokens."""
    logits = logits.clone()
    if p.logit_bias:
        logits[torch.tensor(list(p.logit_bias))] += torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1]).to(torch.int32)
    if p.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(prompt)] = True
        seen |= counts > 0
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        c = counts.to(logits.dtype)
        logits -= p.frequency_penalty * c + p.presence_penalty * (c > 0).to(logits.dtype)
    banned = [i for i in p.stop_token_ids + ([] if p.ignore_eos else [EOS]) if i < logits.shape[-1]]
    if p.min_tokens > 0 and banned and len(generated) < p.min_tokens:
        logits[torch.tensor(banned)] = float("-inf")
    return logits


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The old `sampling_probs` (kept in engine/sampler.py for one row with host parameters), copied here so a
    change there cannot move the reference."""
    logits = logits.float() / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        probs_sorted, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        drop_sorted = torch.cumsum(probs_sorted, dim=-1) - probs_sorted >= p.top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return torch.softmax(logits, dim=-1)


def reference_step(logits, params, generators, generated, num_logprobs):
    """One step the old way: a chain per row, the draws in row order, then the same one read-back."""
    tokens = logits.argmax(dim=-1)
    probs, draw_rows, draw_generators = [], [], []
    for row, p in enumerate(params):
        shaped = reference_shape(logits[row], p, PROMPT, generated[row])
        if p.greedy:
            tokens[row] = shaped.argmax()
        else:
            probs.append(reference_probs(shaped, p))
            draw_rows.append(row)
            draw_generators.append(generators[row])
    valid = None
    if probs:
        drawn, valid = draw(torch.stack(probs), draw_generators)
        for i, row in enumerate(draw_rows):
            tokens[row] = drawn[i]
    results, valid = read_back(tokens, torch.log_softmax(logits.float(), dim=-1), num_logprobs, valid)
    for row, ok in zip(draw_rows, valid):
        if not ok:
            results[row].error = INVALID_PROBABILITIES
    return results


# ---- the batch every test uses -----------------------------------------------------------------------------------

MIXED = [
    dict(temperature=0),                                                    # plain greedy
    dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.4),      # greedy after penalties
    dict(temperature=0.8, seed=11),                                         # seeded, no truncation
    dict(temperature=1.0),                                                  # unseeded (default generator)
    dict(temperature=0.7, top_k=5, seed=12),                                # top-k
    dict(temperature=1.1, top_p=0.6, seed=13, logprobs=3),                  # top-p, logprobs
    dict(temperature=0.9, min_p=0.15, seed=14),                             # min-p
    dict(temperature=1.2, top_k=40, top_p=0.9, min_p=0.05, seed=15),        # all three
    dict(temperature=0.6, frequency_penalty=0.7, repetition_penalty=0.8, seed=16, logprobs=0),
    dict(temperature=1.0, logit_bias={3: 4.0, 200: -3.0, 9: 1.5}, seed=17),  # logit_bias
    dict(temperature=0.5, min_tokens=3, stop_token_ids=[2, 4], seed=18),    # min_tokens ban, then lifted
    dict(temperature=0, logit_bias={50: 2.5}, logprobs=5),                  # greedy + bias + logprobs
    dict(temperature=1.3, top_k=1, seed=19),                                # top-k 1: its argmax
    dict(temperature=0.9, top_p=0.95, frequency_penalty=-0.5, presence_penalty=1.0),  # unseeded, shaped
]


def _params(kinds):
    return [SamplingParams(max_tokens=16, **kw) for kw in kinds]


def _logits(num_rows: int, seed: int) -> torch.Tensor:
    logits = torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    logits[:, 100:110] = logits[:, 100:101]  # ties, so a sort's order among equals matters
    return logits


def _batched_step(logits, params, rows, penalties, generators, num_out, num_logprobs):
    batch = SamplingBatch(logits)
    for row, p in enumerate(params):
        if p.greedy and penalties[row] is None:
            continue  # plain greedy: the batch's argmax (`Sequence.plain_greedy`)
        batch.sample(row, p, rows[row], penalties[row], num_out, generators[row])
    return batch.run(num_logprobs)


@pytest.mark.timeout(60)
def test_batched_steps_equal_the_per_row_path():
    """Five steps of the mixed batch: each step's results (token, raw logprob, rank, top-k, error) equal the old
    per-row path's, seeded rows from their own generators and unseeded ones from the default generator in the
    same order; penalty counts advance on the device as the token lists do."""
    params = _params(MIXED)
    rows = [sampling_row(p, VOCAB) for p in params]
    penalties = [Penalties.of(p, PROMPT, VOCAB, EOS, torch.device("cpu")) for p in params]
    new_generators = [make_generator(p.seed) for p in params]
    old_generators = [make_generator(p.seed) for p in params]
    generated: list[list[int]] = [[] for _ in params]
    num_logprobs = max(p.logprobs for p in params if p.logprobs is not None)
    for step in range(5):
        logits = _logits(len(params), seed=step)
        torch.manual_seed(100 + step)
        expected = reference_step(logits, params, old_generators, generated, num_logprobs)
        torch.manual_seed(100 + step)
        got = _batched_step(logits, params, rows, penalties, new_generators, step, num_logprobs)
        assert got == expected, f"step {step}"
        for row, result in enumerate(got):
            generated[row].append(result.token)
        for p, pen in zip(params, penalties):
            if pen is not None and pen.counts is not None:
                assert pen.counts.tolist() == torch.bincount(torch.tensor(generated[params.index(p)]),
                                                             minlength=VOCAB).tolist()
    assert len({tuple(g) for g in generated}) > 1  # the rows differ: the batch really mixes kinds


@pytest.mark.timeout(60)
def test_batch_probs_are_bit_identical_per_row():
    """Each row's distribution from the batched chain equals the per-row chain's exactly, whatever the other rows
    ask for (a row with top_p 1 must not lose tail tokens whose mass-before rounds to >= 1)."""
    kinds = [kw for kw in MIXED if kw.get("temperature", 1.0) != 0]
    kinds += [dict(top_p=1.0), dict(top_k=VOCAB), dict(top_k=VOCAB - 1, top_p=0.999), dict(min_p=1.0),
              dict(temperature=100.0, top_p=0.5), dict(temperature=1e-4, top_k=3)]
    params = _params(kinds)
    logits = _logits(len(params), seed=7)
    logits[1] = torch.linspace(-30, 30, VOCAB)  # a long tail: cumsum rounding reaches 1.0 before its end
    rows = torch.stack([sampling_row(p, VOCAB) for p in params])
    batched = batch_probs(logits, rows, params)
    for i, p in enumerate(params):
        expected = reference_probs(logits[i], p)
        assert torch.equal(batched[i], expected), kinds[i]
        assert torch.equal(sampling_probs(logits[i], p), expected), kinds[i]
        alone = batch_probs(logits[i:i + 1], rows[i:i + 1], [p])[0]
        assert torch.equal(alone, expected), kinds[i]


@pytest.mark.timeout(60)
def test_shaped_rows_are_bit_identical_per_row():
    """`Penalties.apply_rows` on the stacked rows equals the old per-row shaping (sparse logit_bias ids, counts
    from the token lists), rows without some kind of state included."""
    params = _params(MIXED)
    penalties = [Penalties.of(p, PROMPT, VOCAB, EOS, torch.device("cpu")) for p in params]
    generated = [[3, 3, 9, 200, 7][: i % 3] for i in range(len(params))]  # row 10 (min_tokens 3) made 1: banned
    for pen, tokens in zip(penalties, generated):
        if pen is not None:
            pen.count(torch.tensor(tokens, dtype=torch.long))
    logits = _logits(len(params), seed=3)
    num_out = [len(g) for g in generated]
    shaped = Penalties.apply_rows(logits, torch.stack([sampling_row(p, VOCAB) for p in params]), penalties, num_out)
    assert torch.isinf(shaped[10, [EOS, 2, 4]]).all()
    for i, p in enumerate(params):
        assert torch.equal(shaped[i], reference_shape(logits[i], p, PROMPT, generated[i])), MIXED[i]
        if penalties[i] is not None:
            assert torch.equal(penalties[i].apply(logits[i], num_out[i]), shaped[i]), MIXED[i]


@pytest.mark.timeout(60)
def test_an_invalid_row_of_a_batch_fails_alone():
    """A row whose parameters make its probabilities NaN (a temperature validation refuses) gets the error; the
    others draw what they draw without it."""
    params = _params([kw for kw in MIXED if kw.get("seed") is not None])
    bad = SamplingParams(temperature=1.0, seed=3)
    bad.temperature = float("nan")
    logits = _logits(len(params) + 1, seed=9)

    def run(rows):  # rows: indices into params + [bad]; each keeps its own logits row
        everyone = params + [bad]
        batch = SamplingBatch(torch.stack([logits[r] for r in rows]))
        for i, r in enumerate(rows):
            p = everyone[r]
            batch.sample(i, p, sampling_row(p, VOCAB), Penalties.of(p, PROMPT, VOCAB, EOS, torch.device("cpu")),
                         0, make_generator(p.seed))
        return batch.run()

    n = len(params)
    with_bad = run([0, 1, n] + list(range(2, n)))
    assert with_bad[2].error == INVALID_PROBABILITIES
    good = with_bad[:2] + with_bad[3:]
    assert [r.error for r in good] == [None] * n
    assert [r.token for r in good] == [run([i])[0].token for i in range(n)]
    assert good == run(list(range(n)))  # logprobs too
